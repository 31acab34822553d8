"""Calibrated quantization of a whole model, block by block.

    quantize_(model, Int4WeightOnly(group_size=64, method="gptq"), calibration=batches)

1. Float pass: the float model runs on every calibration batch once. It keeps the final output
   (for the model-level error) and checks that the repeated blocks (``find_blocks``: the largest
   ``nn.ModuleList`` of same-type modules holding target Linear layers, e.g. BERT's
   ``encoder.layer``, Llama's ``model.layers``) are chained: each called once per batch, each
   fed the previous one's output. If not, the whole model is treated as one unit.
2. Layers before the blocks (target layers that only ran before block 0 in the float pass,
   e.g. an input projection) are calibrated first, on forwards stopped at block 0.
3. Capture: a forward pre-hook on block 0 records its arguments and raises a private exception
   to stop the forward there.
4. For each block in turn, on the inputs that the already quantized blocks before it produced:
   hooks on its Linear layers gather statistics (GPTQ: H = 2 X^T X; AWQ: mean |x| and a sample
   of rows; SmoothQuant: max |x|) while the float block runs; each layer is quantized by its
   algorithm (``gptq``/``awq``/``smoothquant``: float weights and statistics in, canonical
   tensors out) and swapped in; the block runs again, now quantized, to produce the next
   block's inputs while hooks measure each layer's output error against its float weights.
   Layers fed the same input (q/k/v) share one Hessian factorization.
5. The remaining target layers (a classifier head, a pooler, ``lm_head``; or all of them when
   there are no usable blocks, e.g. a plain ``nn.Sequential``) get one more pass of hooks over
   the whole model; then the quantized model's final output is compared with the float one.

Memory: the model, plus one block's activations for every calibration batch (in and out), plus
one block's statistics (Hessians are K x K float32 per layer, freed as each layer is done). The
model is never copied; float weights are released as their layers are swapped.

Padding: when a batch is a dict with a 2-D ``attention_mask`` whose shape matches the leading
dimensions of a layer's input, padded tokens are left out of every statistic and error.

On an error the hooks are removed and the model's mode restored, but layers already swapped
stay quantized (the swap is in place).
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats
from ..api import _set_child
from .._progress import progress
from . import report as _report
from ._quant import QuantizedWeight, QuantSpec, rtn
from .awq import awq_quantize
from .gptq import factor_hessian, gptq_quantize
from .smoothquant import smoothquant_quantize

AWQ_TOKENS = 4096  # rows of layer inputs kept for AWQ's search (evenly thinned beyond that)
REF_OUTPUT_BYTES = 256 * 2**20  # float outputs kept for the model-level error
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _StopForward(Exception):
    """Raised by the capture hook on block 0: the rest of the forward is not needed."""


@dataclass
class _Batch:
    args: tuple
    kwargs: dict
    mask: Optional[torch.Tensor]  # bool [B, T] of real tokens, from attention_mask
    desc: str


# ------------------------------------------------------------------------- inputs


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor {str(obj.dtype)[6:]} {list(obj.shape)}"
    if isinstance(obj, Mapping):
        return "dict(" + ", ".join(f"{k}: {_describe(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in obj) + ")"
    return type(obj).__name__


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _mask_position(model) -> Optional[int]:
    """The index of ``attention_mask`` among ``model.forward``'s positional parameters (a
    Hugging Face model's is 1: ``model(input_ids, attention_mask)``), or None."""
    if model is None:
        return None
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: forward(*args)
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == "attention_mask":
            return i
    return None


# Calibration batches read before giving up on an iterable that may be endless: far above
# what calibration uses (128 sentences in one to a few hundred batches), far below a hang.
MAX_BATCHES = 1 << 16


def prepare_batches(calibration, device, model: Optional[nn.Module] = None) -> list:
    """Check the calibration data and turn each batch into positional/keyword arguments.
    The padding mask of a batch is its ``attention_mask``, passed by keyword or, when ``model``
    is given, in the position its forward takes it (a tuple ``(input_ids, attention_mask)``)."""
    mask_at = _mask_position(model)
    if isinstance(calibration, (torch.Tensor, Mapping, str, bytes)):
        raise TypeError(
            f"calibration must be an iterable of model inputs (batches), got one "
            f"{_describe(calibration)}; wrap a single batch in a list: calibration=[batch]")
    try:
        items = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of model inputs (tensors, tuples of "
                        f"positional arguments or dicts of keyword arguments), got "
                        f"{type(calibration).__name__}") from None
    batches = []
    for i, b in enumerate(items):
        if i == MAX_BATCHES:  # every batch is kept (each block runs on all): no endless reads
            raise ValueError(
                f"calibration yielded more than {MAX_BATCHES} batches and may never end (an "
                f"endless generator or itertools.repeat); pass a finite one, e.g. "
                f"list(itertools.islice(data, 128)): a few hundred to a few thousand tokens")
        desc = _describe(b)
        if isinstance(b, torch.Tensor):
            args, kwargs = (b,), {}
        elif isinstance(b, Mapping):
            if not all(isinstance(k, str) for k in b):
                raise TypeError(f"calibration batch {i} ({desc:.200}): keyword argument names "
                                "must be strings")
            args, kwargs = (), dict(b)
        elif isinstance(b, (tuple, list)):
            args, kwargs = tuple(b), {}
        else:
            raise TypeError(f"calibration batch {i} is a {type(b).__name__}; expected a tensor, a "
                            "tuple of positional arguments or a dict of keyword arguments")
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if not tensors:
            raise ValueError(f"calibration batch {i} ({desc:.200}) holds no tensor")
        if any(t.numel() == 0 for t in tensors):
            raise ValueError(f"calibration batch {i} ({desc:.200}) holds an empty tensor")
        args, kwargs = _to(args, device), _to(kwargs, device)
        mask = kwargs.get("attention_mask")
        if mask is None and mask_at is not None and mask_at < len(args):
            mask = args[mask_at]
        mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        batches.append(_Batch(args, kwargs, mask, desc))
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch of model inputs (a few "
                         "hundred to a few thousand tokens in all, e.g. 128 sentences)")
    return batches


def call_on_batch(model: nn.Module, i: int, b: _Batch, swapped: int):
    """``model`` on calibration batch ``i``. A failure names the batch; once ``swapped`` layers
    have been swapped (every batch ran through the float model before that), it names the
    swap as the likely cause instead, and says the model is left part-swapped."""
    try:
        return model(*b.args, **b.kwargs)
    except _StopForward:
        raise
    except Exception as e:
        if swapped:
            raise RuntimeError(
                f"calibration batch {i} ran through the float model, but the model failed on it "
                f"after pyquant swapped {swapped} layer(s): {type(e).__name__}: {e}. A common "
                f"cause is code outside a swapped layer that reads its float weights (e.g. its "
                f".weight); keep that layer float with filter_fn. The model keeps the layers "
                f"swapped so far: reload it before trying again") from e
        raise ValueError(
            f"calibration batch {i} ({b.desc:.300}) does not fit the model "
            f"{type(model).__name__}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------- outputs


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        vals = list(out.values())
    elif isinstance(out, (tuple, list)):
        vals = list(out)
    else:
        return None
    for v in vals:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _main_output(out) -> tuple[Optional[torch.Tensor], str]:
    """The output the model-level error compares: logits or last_hidden_state of a Hugging Face
    output, else the first tensor in it."""
    if isinstance(out, torch.Tensor):
        return out, "output"
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state"):
            v = out.get(key)
            if isinstance(v, torch.Tensor):
                return v, key
    t = _first_tensor(out)
    return t, "first tensor of the output"


def _rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[tokens, features] float32, padding rows dropped when the mask fits x."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask]
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


# ------------------------------------------------------------------------- blocks


def find_blocks(model: nn.Module, target_ids: set) -> tuple[Optional[str], list]:
    """(name, blocks) of the largest ``nn.ModuleList`` of distinct same-type modules that
    hold target Linear layers (most target layers, then most blocks); (None, []) if none."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        kids = list(m)
        if len({type(c) for c in kids}) != 1 or len({id(c) for c in kids}) != len(kids):
            continue
        if isinstance(kids[0], nn.Linear):  # parallel heads or experts, not a chain of blocks
            continue
        n = sum(1 for c in kids for sub in c.modules() if id(sub) in target_ids)
        if n == 0:
            continue
        key = (n, len(kids))
        if best is None or key > best[0]:
            best = (key, name, kids)
    return (best[1], best[2]) if best else (None, [])


def _hidden_loc(args: tuple, kwargs: dict):
    """Where a block's hidden-state input is: the first positional tensor, else the
    ``hidden_states`` keyword, else the first floating-point tensor keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return ("arg", 0)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return ("kw", "hidden_states")
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return ("kw", k)
    return None


def _get_hidden(loc, args, kwargs):
    if loc is None:
        return None
    return args[loc[1]] if loc[0] == "arg" else kwargs.get(loc[1])


def _set_hidden(loc, args, kwargs, value):
    if loc[0] == "arg":
        return (value, *args[1:]), kwargs
    return args, {**kwargs, loc[1]: value}


def _same(a, b) -> bool:
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


class _ChainCheck:
    """During the float pass: is each block called once per batch, fed the previous output?
    And which target layers outside the blocks run before block 0 (``pre``)?"""

    def __init__(self, blocks, others: dict):
        self.calls = [0] * len(blocks)
        self.last_out = None
        self.broken: Optional[str] = None
        self.handles = []
        self.started = False  # block 0 has run in the current batch
        self.pre: set = set()
        self.post: set = set()
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(b.register_forward_hook(self._post(i)))
        for k, m in others.items():
            self.handles.append(m.register_forward_hook(self._other(k)))

    def new_batch(self):
        self.started = False
        self.last_out = None

    def _other(self, k):
        def hook(mod, args, out):
            (self.post if self.started else self.pre).add(k)
        return hook

    def _pre(self, i):
        def hook(mod, args, kwargs):
            self.started = True
            self.calls[i] += 1
            h = _get_hidden(_hidden_loc(args, kwargs), args, kwargs)
            if h is None and self.broken is None:
                self.broken = f"block {i} has no tensor input"
            elif i > 0 and not _same(h, self.last_out) and self.broken is None:
                self.broken = f"block {i}'s input is not block {i - 1}'s output"
        return hook

    def _post(self, i):
        def hook(mod, args, out):
            self.last_out = _first_tensor(out)
        return hook

    def reason(self, n_batches: int) -> Optional[str]:
        if self.broken:
            return self.broken
        bad = [i for i, c in enumerate(self.calls) if c != n_batches]
        if bad:
            return (f"block {bad[0]} ran {self.calls[bad[0]]} time(s) for {n_batches} "
                    "batch(es); each block must run once per batch")
        return None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.last_out = None


# ------------------------------------------------------------------------- statistics


class _Stats:
    """What one Linear layer's inputs tell each method, accumulated over calibration tokens."""

    def __init__(self, k: int, method: str, device):
        self.k, self.method, self.tokens, self.bad = k, method, 0, False
        f32 = dict(dtype=torch.float32, device=device)
        self.h = torch.zeros(k, k, **f32) if method == "gptq" else None
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device) \
            if method == "awq" else None
        self.amax = torch.zeros(k, **f32) if method == "smoothquant" else None
        self.sample, self.sample_rows, self.stride = [], 0, 1

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        if not bool(torch.isfinite(x).all()):
            self.bad = True
            return
        self.tokens += x.shape[0]
        if self.h is not None:
            self.h.addmm_(x.T, x)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0, dtype=torch.float64)
            keep = x[::self.stride]
            self.sample.append(keep.clone())
            self.sample_rows += keep.shape[0]
            if self.sample_rows > 2 * AWQ_TOKENS:  # thin evenly: every other row, then stride 2x
                cat = torch.cat(self.sample)[::2].clone()
                self.sample, self.sample_rows, self.stride = [cat], cat.shape[0], self.stride * 2
        if self.amax is not None:
            torch.maximum(self.amax, x.abs().amax(0), out=self.amax)


class _OutErr:
    """Output SQNR of a swapped (quantized or pruned) layer against its float weights on the
    same inputs."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias
        self.signal = self.noise = 0.0
        self.tokens = 0

    def hook(self, mask: Callable[[], Optional[torch.Tensor]]):
        """A forward hook for the swapped layer: adds its output's error against the float
        layer's output on the same input (real tokens only: ``mask()`` is the batch's)."""
        def measure(mod, args, out):
            if not (args and isinstance(args[0], torch.Tensor)):
                return
            ref = F.linear(args[0], self.weight, self.bias)
            m = mask()
            r, q = _rows(ref, m), _rows(out.detach(), m)
            self.signal += float(r.pow(2).sum(dtype=torch.float64))
            self.noise += float((r - q).pow_(2).sum(dtype=torch.float64))
            self.tokens += r.shape[0]
        return measure

    def sqnr_db(self) -> Optional[float]:
        return _report.sqnr_db(self.signal, self.noise) if self.tokens else None


class RefOutputs:
    """The float model's main outputs (``_main_output``) of the first batches, kept on the CPU
    up to REF_OUTPUT_BYTES (at least one), for the model-level error."""

    def __init__(self):
        self.outs: list = []
        self.what, self.kept = "", 0

    def add(self, model_out) -> None:
        out, self.what = _main_output(model_out)
        if out is None:
            return
        nbytes = out.numel() * 4
        if self.kept + nbytes <= REF_OUTPUT_BYTES or not self.outs:
            self.outs.append(out.detach().to("cpu", torch.float32))
            self.kept += nbytes


# ------------------------------------------------------------------------- the runner


class _Runner:
    def __init__(self, model, config, targets, swap_report, batches):
        self.model, self.config, self.report = model, config, swap_report
        self.method = getattr(config, "method", "rtn")
        self.options = getattr(config, "options", None)
        self.spec = QuantSpec.from_config(config)
        self.batches = batches
        self.mask: Optional[torch.Tensor] = None
        self.handles: list = []
        self.fqns: dict[int, list] = {}
        # the float layers still to quantize; each is dropped once swapped, so that its
        # weights are freed (the caller's target list is emptied for the same reason)
        self.modules: dict[int, nn.Linear] = {}
        for fqn, m in targets:
            self.fqns.setdefault(id(m), []).append(fqn)
            self.modules[id(m)] = m
        self.order = list(self.modules)
        self.done: set = set()
        self.layer_acc: dict[int, _report.LayerAccuracy] = {}

    # -- calls ------------------------------------------------------------------------
    def call_model(self, i: int, b: _Batch):
        self.mask = b.mask
        return call_on_batch(self.model, i, b, len(self.done))

    def hook(self, module: nn.Module, fn: Callable, **kw):
        h = module.register_forward_hook(fn, **kw)
        self.handles.append(h)
        return h

    def remove_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- one unit (a block, or the whole model) ---------------------------------------
    def process(self, members: list, run: Callable[[int], Any], n_inputs: int, label: str,
                keep: Optional[int] = None):
        """Quantize the target layers ``members`` (module ids) of a unit whose forward on input
        i is ``run(i)``; returns [run(i) of the quantized unit for the first ``keep`` inputs]
        (all by default; the others still run, for the error statistics)."""
        todo = [k for k in members if k not in self.done]
        stats = {}
        if self.method != "rtn" and todo:
            for k in todo:
                m = self.modules[k]
                st = stats[k] = _Stats(m.in_features, self.method, m.weight.device)

                def grab(mod, args, out, st=st):
                    if args and isinstance(args[0], torch.Tensor):
                        st.add(_rows(args[0].detach(), self.mask))
                self.hook(m, grab)
            for i in range(n_inputs):
                run(i)
            self.remove_hooks()
        # GPTQ: layers fed the same inputs (q/k/v, gate/up) have the same Hessian; factor it
        # once. Exact test (torch.equal), so a mere coincidence of shapes never shares.
        leader: dict = {}
        if self.method == "gptq":
            heads = []
            for k in todo:
                st = stats.get(k)
                if st is None or st.h is None or st.tokens == 0 or st.bad:
                    continue
                for j in heads:
                    sj = stats[j]
                    if sj.tokens == st.tokens and sj.h.shape == st.h.shape \
                            and torch.equal(sj.h, st.h):
                        leader[k], st.h = j, None
                        break
                else:
                    heads.append(k)
                    leader[k] = k
        users = {j: sum(1 for v in leader.values() if v == j) for j in set(leader.values())}
        factors: dict = {}
        errs = {}
        for k in progress(todo, desc=f"{self.method} {label}"):
            m = self.modules[k]
            factor = None
            if k in leader:
                j = leader[k]
                if j not in factors:
                    sj = stats[j]
                    sj.h.mul_(2.0 / sj.tokens)
                    box = [sj.h]
                    sj.h = None
                    factors[j] = factor_hessian(box, self.options, self.fqns[j][0])
                factor = factors[j]
                users[j] -= 1
                if users[j] == 0:
                    del factors[j]
            new, acc = self.quantize_layer(m, stats.pop(k, None), factor)
            del factor
            for fqn in self.fqns[k]:
                _set_child(self.model, fqn, new)
            self.done.add(k)
            del self.modules[k]
            self.layer_acc[k] = acc
            errs[k] = e = _OutErr(m.weight, m.bias)
            self.report.bytes_before += _tensor_bytes(m)
            self.report.bytes_after += _tensor_bytes(new)
            self.hook(new, e.hook(lambda: self.mask))
        keep = n_inputs if keep is None else keep
        outs = []
        for i in range(n_inputs):
            out = run(i)
            if i < keep:
                outs.append(out)
            del out
        self.remove_hooks()
        for k, e in errs.items():
            acc = self.layer_acc[k]
            acc.tokens = e.tokens
            acc.output_sqnr_db = e.sqnr_db()
        return outs

    def quantize_layer(self, m: nn.Linear, st: Optional[_Stats], factor=None):
        name = self.fqns[id(m)][0]
        method, note = self.method, ""
        if len(self.fqns[id(m)]) > 1:
            note = f"shared: also {', '.join(self.fqns[id(m)][1:])}"
        w = m.weight.detach()
        if st is not None and st.bad:
            raise ValueError(f"{method} on {name}: its calibration inputs hold NaN or inf")
        if method != "rtn" and (st is None or st.tokens == 0):
            method = "rtn"
            note = ("no calibration token reached this layer: rounded to nearest; " + note).strip(
                "; ")
        if method == "rtn":
            qw = rtn(w, self.spec)
        elif method == "gptq":
            qw = gptq_quantize(w, factor, self.spec, self.options, what=name)
            if factor.dead is not None:
                n_dead = int(factor.dead.sum())
                note = (f"{n_dead} of {m.in_features} inputs 0 on every calibration token: "
                        f"their weights rounded to nearest, their error not measured; "
                        + note).strip("; ")
        elif method == "awq":
            x = torch.cat(st.sample)
            st.sample = []
            qw = awq_quantize(w, x, (st.abs_sum / st.tokens).to(torch.float32), self.spec,
                              self.options, what=name)
            del x
        elif method == "smoothquant":
            qw = smoothquant_quantize(w, st.amax, self.spec, self.options, what=name)
        else:  # pragma: no cover - configs validate their methods
            raise ValueError(f"unknown method {method!r}")
        new = _make_layer(m, self.config, qw)
        wsqnr = _report.sqnr_db(*qw.error_energy(w))
        acc = _report.LayerAccuracy(name, method, m.out_features, m.in_features, wsqnr, None,
                                    st.tokens if st is not None else 0, note)
        return new, acc


def _make_layer(linear: nn.Linear, config, qw: QuantizedWeight) -> nn.Module:
    """The config's layer holding ``qw``'s canonical tensors (as ``pyquant.load`` builds one)."""
    w = linear.weight
    layer = config.layer_cls.empty(
        w.shape[1], w.shape[0], linear.bias is not None, config,
        bias_dtype=None if linear.bias is None else linear.bias.dtype, device=w.device)
    names = {n for n, _ in layer.named_buffers()}
    if "weight_packed" in names:
        sd = {"weight_packed": formats.pack_int4(qw.codes), "weight_scales": qw.scales,
              "weight_zeros": qw.zeros}
    else:
        sd = {"weight": qw.codes, "weight_scale": qw.scales}
    if qw.input_scale is not None:
        sd["input_scale"] = qw.input_scale
    elif "input_scale" in names:
        sd["input_scale"] = torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
    if linear.bias is not None:
        sd["bias"] = linear.bias.detach()
    layer.load_state_dict(sd, strict=True)
    return layer


def _tensor_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def _sanitize(kwargs: dict) -> dict:
    """Captured block kwargs without a KV cache (blocks re-run on the same batch must not
    append to it)."""
    out = dict(kwargs)
    for k in _CACHE_KWARGS:
        if k in out:
            out[k] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _model_accuracy(refs: list, outs: list, masks: list, what: str):
    cos_sum, cos_min, n, sig, noise = 0.0, 1.0, 0, 0.0, 0.0
    for r, q, mask in zip(refs, outs, masks):
        if q is None or q.shape != r.shape:
            return None
        r = _rows(r, mask).double() if r.dim() >= 2 else r.double().reshape(1, -1)
        q = _rows(q.detach().cpu(), mask).double() if q.dim() >= 2 \
            else q.detach().cpu().double().reshape(1, -1)
        if r.shape[0] == 0:
            continue
        c = F.cosine_similarity(q, r, dim=1, eps=1e-30)
        cos_sum += float(c.sum())
        low = float(c.min())  # NaN where an output was (torch's min propagates it)
        cos_min = low if low != low else min(cos_min, low)  # Python's min(1.0, nan) is 1.0
        n += c.numel()
        sig += float(r.pow(2).sum())
        noise += float((q - r).pow(2).sum())
    if n == 0:
        return None
    rel = (noise / sig) ** 0.5 if sig > 0 else (0.0 if noise == 0 else float("inf"))
    return _report.ModelAccuracy(cos_sum / n, cos_min, rel, _report.sqnr_db(sig, noise), n,
                                 len(refs), what)


def quantize_calibrated(model: nn.Module, config, targets: list, swap_report, calibration):
    """The calibrated path of ``pyquant.quantize_`` (targets: the eligible (fqn, Linear)
    pairs it found). Fills ``swap_report`` (swapped layers, bytes, ``accuracy``) and returns
    it; sets ``model.pyquant_accuracy``."""
    t0 = time.perf_counter()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = prepare_batches(calibration, device, model)
    if not targets:
        # an empty report for the caller; the model keeps its earlier one unless layers
        # changed (sparse layers quantized by rounding, before this call)
        swap_report.accuracy = _report.AccuracyReport(
            scheme=config.scheme, method=getattr(config, "method", "rtn"),
            config=config.to_dict(), calibration={"batches": len(batches), "blocks": None,
                                                  "num_blocks": 0, "seconds": 0.0})
        from ..api import drop_stale_accuracy

        drop_stale_accuracy(model, swap_report)
        return swap_report
    runner = _Runner(model, config, targets, swap_report, batches)
    names = [fqn for fqn, _ in targets]
    targets.clear()  # the runner holds the float layers now, and lets each go once swapped
    method = runner.method
    target_ids = set(runner.modules)
    blocks_name, blocks = find_blocks(model, target_ids)
    cal = {"batches": len(batches), "blocks": blocks_name, "num_blocks": len(blocks)}
    was_training = model.training
    hf_config = getattr(model, "config", None)
    old_use_cache = getattr(hf_config, "use_cache", None)
    chain = None
    try:
        model.eval()
        if isinstance(old_use_cache, bool):
            hf_config.use_cache = False
        with torch.no_grad():
            # 1. float pass: reference outputs (capped) and the chain check of the blocks
            in_blocks = {id(s) for b in blocks for s in b.modules()}
            others = {k: m for k, m in runner.modules.items() if k not in in_blocks}
            chain = _ChainCheck(blocks, others) if blocks else None
            ref_outs = RefOutputs()
            for i, b in enumerate(batches):
                if chain is not None:
                    chain.new_batch()
                ref_outs.add(runner.call_model(i, b))
                if chain is not None:
                    chain.new_batch()
            refs, what = ref_outs.outs, ref_outs.what
            del ref_outs
            if chain is not None:
                why = chain.reason(len(batches))
                chain.remove()
                if why:
                    cal["fallback"] = (f"the blocks of {blocks_name!r} not used ({why}): every layer "
                                       "calibrated in one pass over the whole model")
                    blocks_name, blocks = None, []
                    cal["blocks"], cal["num_blocks"] = None, 0
            outs = None
            if blocks:
                # 2. target layers that run before block 0 only (an input projection): first,
                # on forwards stopped at block 0, so that block 0 sees their quantized output
                captured = []

                def stop(mod, args, kwargs):
                    if captured is not None:
                        captured.append((args, _sanitize(kwargs)))
                    raise _StopForward

                def until_block0(i):
                    h = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
                    try:
                        runner.call_model(i, batches[i])
                    except _StopForward:
                        pass
                    finally:
                        h.remove()

                pre = [k for k in others if k in chain.pre and k not in chain.post]
                others = None
                if pre:
                    captured = None
                    runner.process(pre, until_block0, len(batches), "before the blocks", keep=0)
                    captured = []
                # 3. capture the inputs of block 0
                for i in range(len(batches)):
                    until_block0(i)
                if len(captured) != len(batches):
                    raise ValueError(f"calibration: block {blocks_name}.0 was not reached by "
                                     "every batch")
                loc = _hidden_loc(*captured[0])
                inputs = captured
                del captured
                # 4. block by block
                for bi, block in enumerate(progress(blocks, desc=f"{method}: blocks")):
                    ids = {id(s) for s in block.modules()}
                    members = [k for k in runner.modules if k in ids]

                    def run(i, block=block, inputs=inputs):
                        args, kwargs = inputs[i]
                        runner.mask = batches[i].mask
                        return _first_tensor(block(*args, **kwargs))
                    hidden = runner.process(members, run, len(inputs), f"block {bi}")
                    inputs = [_set_hidden(loc, a, kw, hs)
                              for (a, kw), hs in zip(inputs, hidden)]
                    del hidden
                del inputs
            # 5. layers outside the blocks (or all, without blocks): one pass over the model
            left = [k for k in runner.modules if k not in runner.done]
            if left:
                outs = runner.process(
                    left, lambda i: _main_output(runner.call_model(i, batches[i]))[0],
                    len(batches), "model", keep=len(refs))
            else:
                outs = [_main_output(runner.call_model(i, batches[i]))[0]
                        for i in range(len(refs))]
            model_acc = _model_accuracy(refs, outs, [b.mask for b in batches[:len(refs)]],
                                        what) if refs else None
            del outs, refs
    finally:
        runner.remove_hooks()
        if chain is not None:
            chain.remove()
        if isinstance(old_use_cache, bool):
            hf_config.use_cache = old_use_cache
        model.train(was_training)
    swap_report.swapped.extend(names)
    cal["seconds"] = round(time.perf_counter() - t0, 3)
    acc = _report.AccuracyReport(
        scheme=config.scheme, method=method, config=config.to_dict(), calibration=cal,
        layers=[runner.layer_acc[k] for k in runner.order], model=model_acc)
    swap_report.accuracy = acc
    model.pyquant_accuracy = acc
    return swap_report
