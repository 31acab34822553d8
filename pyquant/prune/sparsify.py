"""sparsify_: prune every eligible nn.Linear of any module tree and swap in a compressed layer."""
from __future__ import annotations

import collections

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .._progress import progress
from ..api import (SwapReport, _set_child, _tensor_bytes, check_filter_and_calibration,
                   config_mistake, drop_stale_accuracy, linear_candidates, other_module_reason,
                   parameter_owners, _drain)
from ..calibrate import report as _report
from ..config import SparseConfig
from .masks import magnitude_mask, wanda_mask
from .sequential import Errors, run_sequential
from .sparsegpt import sparsegpt_prune


@dataclass
class SparsifyReport(SwapReport):
    """``quantize_``'s report plus how the pruning ran: ``calibration`` (batches, blocks) and
    per-layer ``notes`` (e.g. a layer no calibration token reached, pruned by magnitude)."""

    calibration: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # [(fqn, note)]

    def __str__(self) -> str:
        lines = [super().__str__().replace("swapped", "sparsified", 1)]
        if self.calibration:
            lines.append(f"  calibration: {self.calibration}")
        lines += [f"  note {fqn}: {note}" for fqn, note in self.notes]
        return "\n".join(lines)


class _Tokens:
    """magnitude with calibration data: no statistic, only the token count (the data serves
    the accuracy report)."""

    def __init__(self, k: int, device):
        self.tokens, self.bad = 0, False

    def add(self, x: torch.Tensor) -> None:
        self.tokens += x.shape[0]


class _SqSum:
    """Wanda: sum over tokens of x_j^2 per input channel."""

    def __init__(self, k: int, device):
        self.sq = torch.zeros(k, dtype=torch.float64, device=device)
        self.tokens, self.bad = 0, False

    def add(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            self.bad = True
            return
        self.tokens += x.shape[0]
        self.sq += x.double().pow(2).sum(0)


class _Hessian:
    """SparseGPT: X^T X over tokens (float32, K x K)."""

    def __init__(self, k: int, device):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.tokens, self.bad = 0, False

    def add(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            self.bad = True
            return
        self.tokens += x.shape[0]
        self.h.addmm_(x.T, x)


def prune_weight(w: torch.Tensor, config: SparseConfig, stat=None, what: str = "weight"):
    """(weight to compress, keep-mask) of one layer for ``config``'s method and pattern, from
    its statistic (None: magnitude). Pure PyTorch; no kernel."""
    sparsity, nm = config.pattern
    method = config.method if stat is not None else "magnitude"
    if method == "magnitude":
        return w, magnitude_mask(w, sparsity, nm)
    if method == "wanda":
        return w, wanda_mask(w, stat.sq, sparsity, nm)
    if method == "sparsegpt":
        o = config.options
        new, mask = sparsegpt_prune(w, stat.h, sparsity, nm, block_size=o.block_size,
                                    damp=o.damp_percent, what=what)
        return new.to(w.dtype), mask
    raise ValueError(f"unknown pruning method {method!r}")  # pragma: no cover


def sparsify_(
    model: nn.Module,
    config: SparseConfig,
    calibration: Optional[Iterable[Any]] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> SparsifyReport:
    """Prune, in place, every ``nn.Linear`` of ``model`` that ``config`` supports (and that
    ``filter_fn(module, fqn)`` accepts) and replace it with the config's compressed sparse layer.

    ``config``: ``Sparse24(method=...)``, ``Unstructured(sparsity=..., method=...)`` or the
    combined ``Sparse24Int8WeightOnly`` / ``Sparse24Int4WeightOnly``. ``method="magnitude"``
    needs no data; ``"wanda"`` and ``"sparsegpt"`` need ``calibration``: an iterable of model
    inputs (tensors, tuples of positional arguments or dicts of keyword arguments), processed
    block by block (pyquant.prune.sequential) so that each block is pruned on the outputs of
    the already pruned blocks before it."""
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a pyquant sparsity config such as pyquant.Sparse24() or "
                        f"pyquant.Unstructured(0.5), got {config_mistake(config)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("sparsify_ swaps layers inside a model and cannot replace the model "
                         "object itself; wrap it (nn.Sequential(linear)) or use "
                         f"{config.layer_cls.__name__}.from_float(linear, config)")
    check_filter_and_calibration("sparsify_", filter_fn, calibration)
    method = config.method
    if method != "magnitude" and calibration is None:
        raise ValueError(f"{type(config).__name__}(method={method!r}) needs calibration data: "
                         "pass sparsify_(model, config, calibration=batches) with an iterable "
                         "of model inputs (e.g. 128 tokenized sentences), or use "
                         "method='magnitude'")
    layer_cls = config.layer_cls
    report = SparsifyReport(config)
    fqns: dict[int, list] = {}
    mods: dict[int, nn.Module] = {}
    owners = parameter_owners(model)
    for fqn, m in model.named_modules(remove_duplicate=False):
        if (not isinstance(m, nn.Linear) and other_module_reason(m)
                and (filter_fn is None or filter_fn(m, fqn))):
            report.skipped.append((fqn, other_module_reason(m)))

    def reason(lin):
        if lin.weight.is_meta:
            return "weight on the meta device (no values to prune): load the float weights first"
        return layer_cls.unsupported_reason(lin, config)

    for fqn, m in linear_candidates(model, filter_fn, owners, reason, report.skipped):
        fqns.setdefault(id(m), []).append(fqn)
        mods[id(m)] = m
    del owners  # it holds every float layer: freed as they are swapped only once it is gone
    m = None

    layer_acc: dict = {}

    def finish(m: nn.Module, stat) -> nn.Module:
        name = fqns[id(m)][0]
        used, note = method, ""
        if len(fqns[id(m)]) > 1:
            note = f"shared: also {', '.join(fqns[id(m)][1:])}"
        if stat is not None and stat.bad:
            raise ValueError(f"{method} on {name}: its calibration inputs hold NaN or inf")
        tokens = stat.tokens if stat is not None else 0
        if stat is not None and stat.tokens == 0 and method != "magnitude":
            why = "no calibration token reached this layer: pruned by magnitude"
            report.notes.append((name, why))
            used, note = "magnitude", f"{why}; {note}".strip("; ")
        if used == "magnitude":
            stat = None
        elif stat is not None:
            n_dead = int(((stat.sq if used == "wanda" else stat.h.diagonal()) == 0).sum())
            if n_dead:
                note = (f"{n_dead} of {m.in_features} inputs 0 on every calibration token: "
                        + ("their weights score 0 and are pruned first" if used == "wanda" else
                           "their weights cost nothing on this data and compete by magnitude")
                        + "; " + note).strip("; ")
        w, mask = prune_weight(m.weight.detach(), config, stat, what=name)
        new = layer_cls.from_float(m, config, mask=mask, weight=w)
        report.bytes_before += _tensor_bytes(m)
        report.bytes_after += _tensor_bytes(new)
        for fqn in fqns[id(m)]:
            _set_child(model, fqn, new)
            report.swapped.append(fqn)
        if calibration is not None:
            ref = m.weight.detach().float()
            noise = float((ref - new.dense_weight().float()).pow(2).sum(dtype=torch.float64))
            layer_acc[id(m)] = _report.LayerAccuracy(
                name, used, m.out_features, m.in_features,
                _report.sqnr_db(float(ref.pow(2).sum(dtype=torch.float64)), noise), None,
                tokens, note)
        return new

    if method == "magnitude" and calibration is not None:
        report.notes.append(("<model>", "calibration data given with method='magnitude': "
                                        "pruned by |w| alone, the data only measured the "
                                        "accuracy (method='wanda' or 'sparsegpt' prune with it)"))
    t0 = time.perf_counter()
    with torch.no_grad():
        if calibration is None:
            # taken off one by one, so that each float layer is freed once swapped
            queue = collections.deque(mods.values())
            mods = dict.fromkeys(mods)  # the ids alone: the report's order
            for m in progress(_drain(queue), desc=f"sparsify {config.scheme}", total=len(queue)):
                finish(m, None)
            m = None
        else:
            stat_cls = {"magnitude": _Tokens, "wanda": _SqSum, "sparsegpt": _Hessian}[method]
            errors = Errors()
            report.calibration = run_sequential(
                model, list(mods.values()), calibration,
                lambda m: stat_cls(m.weight.shape[1], m.weight.device), finish, desc=method,
                measure=errors)
            for k, e in errors.layers.items():
                layer_acc[k].tokens = e.tokens
                layer_acc[k].output_sqnr_db = e.sqnr_db()
    report.calibration["seconds"] = round(time.perf_counter() - t0, 3)
    if calibration is None:
        drop_stale_accuracy(model, report)
    else:
        report.accuracy = model.pyquant_accuracy = _report.AccuracyReport(
            scheme=config.scheme, method=method, config=config.to_dict(),
            calibration=dict(report.calibration), layers=[layer_acc[k] for k in mods],
            model=errors.model if mods else None)
    return report
