"""quantize_: walk any module tree and swap every eligible nn.Linear for a quantized layer."""
from __future__ import annotations

import collections

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ._progress import progress
from .config import QuantConfig


@dataclass
class SwapReport:
    """What ``quantize_`` did: the layers it swapped and the ones it skipped, with reasons."""

    config: QuantConfig
    swapped: list = field(default_factory=list)  # [fqn]
    skipped: list = field(default_factory=list)  # [(fqn, reason)]
    bytes_before: int = 0
    bytes_after: int = 0
    #: calibrate.report.AccuracyReport when quantize_ had calibration data, else None
    accuracy: Optional[Any] = None

    def __str__(self) -> str:
        lines = [
            f"{type(self.config).__name__}: swapped {len(self.swapped)} linear layer(s), "
            f"skipped {len(self.skipped)}; linear weights {self.bytes_before / 2**20:.2f} MiB -> "
            f"{self.bytes_after / 2**20:.2f} MiB"
        ]
        for fqn, why in self.skipped:
            lines.append(f"  skipped {fqn or '<root>'}: {why}")
        if self.accuracy is not None:
            lines.append(str(self.accuracy))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"SwapReport(config={self.config!r}, swapped={len(self.swapped)}, "
                f"skipped={len(self.skipped)})")


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Puts ``new`` at ``fqn``; the large CPU weights of the pyquant layers in it go onto huge
    pages first (_hugepages: decode streams them faster)."""
    from ._hugepages import place_module
    from .nn import _QuantLinearBase

    for m in new.modules():
        if isinstance(m, _QuantLinearBase):
            place_module(m)
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tensor_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def drop_stale_accuracy(model: nn.Module, report: SwapReport) -> None:
    """Layers were swapped without a new accuracy report: the model's earlier one (of a
    previous calibrated quantize_ or sparsify_) no longer describes those layers, so it goes,
    and pyquant.save then writes none. A call that swaps nothing leaves it."""
    if report.swapped and getattr(model, "pyquant_accuracy", None) is not None:
        del model.pyquant_accuracy


def check_filter_and_calibration(fn: str, filter_fn, calibration) -> None:
    """quantize_ takes (model, config, filter_fn, calibration) and sparsify_ (model, config,
    calibration, filter_fn): an argument passed in the other's place gets a clear error."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: filter_fn must be a callable (module, fqn) -> bool, got "
                        f"{type(filter_fn).__name__}; pass calibration data as calibration=...")
    if calibration is not None and (callable(calibration) or
                                    not hasattr(calibration, "__iter__")):
        raise TypeError(f"{fn}: calibration must be an iterable of model inputs, got "
                        f"{type(calibration).__name__}; pass a layer filter as filter_fn=...")


def config_mistake(config) -> str:
    """What a wrong ``config`` argument is, for the error: a config class gets the hint to
    call it."""
    if isinstance(config, type):
        return (f"the class {config.__name__} itself; pass an instance: "
                f"pyquant.{config.__name__}()")
    return type(config).__name__


def parameter_owners(model: nn.Module) -> dict:
    """{id(parameter): [(fqn, module), ...]}: every module (by every name) holding it."""
    owners: dict[int, list] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append((fqn, m))
    return owners


_READS_WEIGHT: dict = {}


def parent_reads_weight(parent: nn.Module, child: str) -> bool:
    """True when ``type(parent).forward``'s source reads ``self.<child>.weight`` (T5's feed
    forward checks ``wo.weight.dtype``, Mamba casts to ``lm_head.weight.dtype``): a swapped
    layer has no float weight there (int4: none at all; int8: the codes). Cached per class;
    False where the source cannot be read."""
    key = (type(parent), child)
    if key not in _READS_WEIGHT:
        import inspect
        import re

        try:
            src = inspect.getsource(type(parent).forward)
        except (OSError, TypeError):
            src = ""
        _READS_WEIGHT[key] = re.search(rf"self\.{re.escape(child)}\.weight\b", src) is not None
    return _READS_WEIGHT[key]


def structural_skip_reason(model: nn.Module, fqn: str, m: nn.Module, owners: dict) -> Optional[str]:
    """Why the nn.Linear ``m`` at ``fqn`` must stay as it is whatever the config, or None:
    - an nn.LazyLinear before its first forward: no weight yet;
    - nn.MultiheadAttention's out_proj: the attention reads ``out_proj.weight`` itself (its
      fused kernel), so a swapped layer would break it;
    - likewise any layer whose parent's forward reads its ``.weight`` (parent_reads_weight);
    - a weight shared with another module (an embedding tied to the output projection): a
      quantized copy would be added while the float weight stays for the other user."""
    if isinstance(getattr(m, "weight", None), nn.parameter.UninitializedParameter):
        return "nn.LazyLinear not initialized yet: run one forward before quantizing"
    parent = model.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else model
    if (isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)
            or isinstance(parent, nn.MultiheadAttention)):
        return ("out_proj of nn.MultiheadAttention, which reads its weight directly (not "
                "through forward): stays float")
    child = fqn.rpartition(".")[2]
    if fqn and parent_reads_weight(parent, child):
        return (f"{type(parent).__name__}.forward reads {child}.weight itself, which a "
                f"quantized layer does not hold as float: stays float")
    w = getattr(m, "weight", None)
    others = [(f, o) for f, o in owners.get(id(w), []) if o is not m]
    if others:
        f, o = others[0]
        return (f"weight tied to {f or '<root>'} ({type(o).__name__}): a quantized copy would "
                f"add to the float weight the other keeps; untie it first to quantize it")
    return None


def other_module_reason(m: nn.Module) -> Optional[str]:
    """A skip reason for modules the walk meets that are not nn.Linear but look like one to a
    user: pyquant's own layers (already quantized or pruned)."""
    from .nn import _QuantLinearBase

    if isinstance(m, _QuantLinearBase):
        return f"already a pyquant layer ({type(m).__name__})"
    return None


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and its kin): y = x @ W + b with W [in, out], a Linear with
    its weight transposed."""
    return (type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")
            and hasattr(m, "nx") and hasattr(m, "nf"))


def conv1d_as_linear(m: nn.Module) -> nn.Linear:
    """The nn.Linear a Conv1D computes (weight W.T, the same bias); built on meta, then given
    its tensors: no random init of a throwaway weight."""
    w = m.weight
    lin = nn.Linear(m.nx, m.nf, bias=m.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if m.bias is not None:
        lin.bias = m.bias
    return lin


def linear_candidates(model: nn.Module, filter_fn, owners: dict, reason, skipped: list):
    """The (fqn, nn.Linear) pairs of ``model`` to swap, every name of a shared layer included
    (a Linear shared by two parents is swapped in both places, for one new layer, or the model
    would stay half float);
    the others go to ``skipped`` with why (filter_fn, structural_skip_reason, ``reason(m)``:
    the config's own). A Conv1D that qualifies is first replaced, in the model, by the
    nn.Linear it computes, so calibration, pruning and checkpoints see a Linear."""
    out, as_linear = [], {}
    for fqn, m in list(model.named_modules(remove_duplicate=False)):
        conv = is_conv1d(m)
        if not (isinstance(m, nn.Linear) or conv):
            continue
        if filter_fn is not None and not filter_fn(m, fqn):
            skipped.append((fqn, "rejected by filter_fn"))
            continue
        lin = m
        if conv:
            if id(m) not in as_linear:  # one Linear for a Conv1D shared under two names
                as_linear[id(m)] = conv1d_as_linear(m)
            lin = as_linear[id(m)]
        why = structural_skip_reason(model, fqn, m, owners) or reason(lin)
        if why:
            skipped.append((fqn, why))
            continue
        if conv:
            _set_child(model, fqn, lin)
        out.append((fqn, lin))
    return out


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    calibration: Optional[Iterable[Any]] = None,
) -> SwapReport:
    """Replace, in place, every ``nn.Linear`` of ``model`` that ``config`` supports (and that
    ``filter_fn(module, fqn)`` accepts) with the config's quantized layer. Returns a report.

    ``calibration``: an iterable of model inputs (each a tensor, a tuple of positional
    arguments, or a dict of keyword arguments such as a tokenizer's output). Calibrated methods
    (``method="gptq"``, ``"awq"``, ``"smoothquant"``) need it; with it, any method runs block by
    block on those inputs (``pyquant.calibrate``) and the report's ``accuracy`` holds the error
    of every layer and of the model's output, which ``model.pyquant_accuracy`` keeps too (and
    ``pyquant.save`` writes beside the checkpoint)."""
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a pyquant config such as pyquant.Int8WeightOnly(), "
            f"got {config_mistake(config)}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError(
            "quantize_ swaps layers inside a model and cannot replace the model object itself; "
            "wrap it (nn.Sequential(linear)) or use "
            f"{config.layer_cls.__name__}.from_float(linear, config)"
        )
    from .config import SparseConfig

    if isinstance(config, SparseConfig):
        raise TypeError(f"{type(config).__name__} is a sparsity config: use "
                        f"pyquant.sparsify_(model, {type(config).__name__}(...))")
    check_filter_and_calibration("quantize_", filter_fn, calibration)
    method = getattr(config, "method", "rtn")
    if calibration is None and method != "rtn":
        raise ValueError(
            f"{type(config).__name__}(method={method!r}) needs calibration data: pass "
            f"quantize_(model, config, calibration=batches) with an iterable of model inputs "
            f"(e.g. a few hundred tokenized sentences), or use method='rtn'"
        )
    layer_cls = config.layer_cls
    report = SwapReport(config)
    sparse_targets = []
    owners = parameter_owners(model)
    for fqn, m in model.named_modules(remove_duplicate=False):
        sparse, why = hasattr(m, "pyquant_quantize"), other_module_reason(m)
        if isinstance(m, nn.Linear) or not (sparse or why) or (filter_fn and not filter_fn(m, fqn)):
            continue
        if sparse:  # a sparse layer (pyquant.sparse_nn) becomes a combined sparse + quantized one
            sparse_targets.append((fqn, m))
        else:
            report.skipped.append((fqn, why))
    targets = linear_candidates(model, filter_fn, owners,
                                lambda lin: layer_cls.unsupported_reason(lin, config),
                                report.skipped)
    # owners and the loop variable hold every float layer: without this they stayed alive
    # until quantize_ returned, whatever the swaps below let go
    del owners
    m = None
    if sparse_targets and not targets and calibration is not None and method != "rtn":
        # every layer is sparse, and sparse layers take rounding to nearest only: nothing
        # would be calibrated (it used to return with every layer skipped)
        raise ValueError(
            f"quantize_ with method={method!r}: the {len(sparse_targets)} layer(s) to quantize "
            f"are all sparse (e.g. {sparse_targets[0][0]!r}), and sparse layers take only "
            f"method='rtn'; quantize_(model, {type(config).__name__}()) rounds their kept values "
            f"to nearest, or prune with calibration and quantize in one pass: sparsify_(model, "
            f"Sparse24Int8WeightOnly(method='sparsegpt') or Sparse24Int4WeightOnly(...), "
            f"calibration=...)")
    if sparse_targets:
        _quantize_sparse(model, config, sparse_targets, report)
    if calibration is not None:
        from .calibrate.sequential import quantize_calibrated

        on_meta = [fqn for fqn, lin in targets if lin.weight.is_meta]
        if on_meta:  # the calibration pass runs the float model: it needs the values
            raise ValueError(
                f"quantize_ with calibration runs the float model, but {len(on_meta)} layer(s) "
                f"hold weights on the meta device (no values), e.g. {on_meta[0]!r}: load the "
                f"float weights first (quantize_ without calibration on a meta model builds a "
                f"quantized skeleton, for pyquant.load)")

        # quantize_calibrated empties ``targets`` so that each float layer is freed once it
        # has been swapped; drop this frame's last loop reference too
        m = None
        return quantize_calibrated(model, config, targets, report, calibration)
    done: dict[int, nn.Module] = {}
    queue = collections.deque(targets)  # taken off one by one: a swapped float layer is freed
    del targets
    with torch.no_grad():
        for fqn, m in progress(_drain(queue), desc=f"quantize {config.scheme}", total=len(queue)):
            new = done.get(id(m))
            if new is None:
                new = done[id(m)] = layer_cls.from_float(m, config)
                report.bytes_before += _tensor_bytes(m)
                report.bytes_after += _tensor_bytes(new)
            _set_child(model, fqn, new)
            report.swapped.append(fqn)
    drop_stale_accuracy(model, report)
    return report


def _drain(queue):
    """The items of a deque, each taken off it as it is handed out (the caller's loop variable
    is then the only reference the loop keeps)."""
    while queue:
        yield queue.popleft()


def _quantize_sparse(model, config, targets, report) -> None:
    """Sparse layers ask themselves (``pyquant_quantize``) for their combined sparse + quantized
    form; the ones that cannot are reported as skipped with the reason."""
    done: dict[int, nn.Module] = {}
    with torch.no_grad():
        for fqn, m in targets:
            new = done.get(id(m))
            if new is None:
                new, why = m.pyquant_quantize(config)
                if new is None:
                    report.skipped.append((fqn, why))
                    continue
                done[id(m)] = new
                report.bytes_before += _tensor_bytes(m)
                report.bytes_after += _tensor_bytes(new)
            _set_child(model, fqn, new)
            report.swapped.append(fqn)
