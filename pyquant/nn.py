"""Quantized linear layers. Each is built from a float ``nn.Linear`` by ``from_float`` (pure
PyTorch quantization from ``formats``), keeps its tensors as plain buffers in the canonical
formats (so ``state_dict`` round-trips exactly and checkpoints are backend-neutral) and runs
``forward`` as one ``torch.ops.pyquant.*`` call. The dynamic layers (W8A8, W4A8) on CPUs whose
kernels take it keep their weight buffers in the CPU panel layout instead (``_PanelLayout``,
``pyquant.panels``), and give the canonical formats back wherever the weight leaves them."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import _checks, _native, formats
from . import panels as _panels
from . import ops as _ops  # registers torch.ops.pyquant.*
from .config import Int4Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, QuantConfig
from .config import INPUT_SCALE_METHODS


def nonfinite_reason(w: torch.Tensor) -> Optional[str]:
    """Why a float weight with NaN or Inf entries cannot be quantized (its row's scale would be
    NaN or Inf, and pyquant.load refuses such a checkpoint), or None. One float64 sum finds
    them without a weight-sized temporary (a finite float32 weight cannot overflow it); only a
    weight that fails it is counted."""
    if w.is_meta or torch.isfinite(w.detach().sum(dtype=torch.float64)):
        return None
    nan = int(torch.isnan(w).sum())
    inf = int(torch.isinf(w).sum())
    return (f"weight has {nan} NaN and {inf} Inf value(s): a quantized or pruned layer cannot "
            f"hold them (a NaN or Inf scale); fix the weights first")


def check_from_float_config(cls, config) -> None:
    """A layer class's from_float given a config that makes another layer (or no config) is a
    TypeError naming the class that config makes, not an AttributeError deep inside."""
    if config is None:
        return
    made = getattr(config, "layer_cls", None) if isinstance(config, QuantConfig) else None
    if made is cls:
        return
    want = cls.config_cls.__name__
    if made is None:
        raise TypeError(f"{cls.__name__}.from_float takes a pyquant.{want}(...) config, got "
                        f"{type(config).__name__}")
    raise TypeError(f"{cls.__name__}.from_float got {type(config).__name__}, a config for "
                    f"{made.__name__}: pass pyquant.{want}(...), or call "
                    f"{made.__name__}.from_float(linear, config)")


class _QuantLinearBase(nn.Module):
    config_cls: type = QuantConfig
    _config: Optional[QuantConfig] = None  # the config it was built with (method included)

    def __init__(self, in_features: int, out_features: int, bias: bool, bias_dtype, device):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias:
            self.register_buffer(
                "bias", torch.zeros(out_features, dtype=bias_dtype or torch.float32, device=device)
            )
        else:
            self.bias = None
        # AWQ / SmoothQuant migrate a per-input-channel factor from the activations into the
        # weights; a generic module tree has no previous op to fold 1/s into, so the layer
        # multiplies x by it (float32 [K], finite, > 0). None (not in state_dict) otherwise.
        self.register_buffer("input_scale", None)

    #: Float buffers that are float32 by the ops' contract (weight scales, input scales).
    #: ``model.half()``, ``.bfloat16()`` and ``.to(dtype)`` cast every float buffer of a module
    #: tree; here they would round the scales and the next forward would stop at the op's
    #: dtype check. So a cast moves these to its device but leaves their dtype, as it leaves
    #: the integer codes; the bias (and the values of the float sparse layers) follow it.
    _FLOAT32_BUFFERS = ("weight_scale", "weight_scales", "input_scale")

    def _apply(self, fn, recurse=True):
        before = {n: self._buffers[n] for n in self._FLOAT32_BUFFERS
                  if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:  # from the original: no rounding
                self._buffers[name] = old.to(device=new.device)
        return self

    def _adopt(self, config: Optional[QuantConfig]):
        """Remember ``config`` (checkpoints store it) and give the layer the ``input_scale``
        buffer its calibration method needs, so that ``empty`` matches a calibrated layer."""
        if config is not None:
            self._config = config
            if getattr(config, "method", "rtn") in INPUT_SCALE_METHODS and self.input_scale is None:
                dev = next((b.device for b in self.buffers()), None)
                self.input_scale = torch.ones(self.in_features, dtype=torch.float32, device=dev)
        return self

    def _call_op(self, op: str, x: torch.Tensor, *args) -> torch.Tensor:
        """``ops.call`` through this layer's ``ops.LayerCall``, which checks the layer's own
        tensors once while they stay the same (not part of the module's state). Tracers
        (torch.compile, jit) see the op alone: no attribute written, no data address read."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return _ops.call(op, x, *args)
        c = self.__dict__.get("_layer_call")
        if c is None:
            c = self.__dict__["_layer_call"] = _ops.LayerCall()
        return c(op, x, *args)

    def _scale_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_scale
        if s is None:
            return x
        if x.dtype == torch.float32:
            return x * s
        return (x.to(torch.float32) * s).to(x.dtype)  # one rounding, not a rounded scale

    @classmethod
    def unsupported_reason(cls, linear: nn.Module, config: QuantConfig) -> Optional[str]:
        """None if ``linear`` can become this layer, else why not (shown in the report)."""
        w = getattr(linear, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return "no 2-D weight"
        if not w.is_floating_point():
            return f"weight dtype {w.dtype} is not a float dtype"
        if w.dtype == torch.float64:
            return ("float64 weights: pyquant's ops take float32, bfloat16 or float16 "
                    "activations; cast the model first (model.float())")
        if w.shape[0] == 0 or w.shape[1] == 0:
            return f"empty weight {tuple(w.shape)}"
        return nonfinite_reason(w)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config, bias_dtype=None,
              device=None):
        """An uninitialized layer of the right shapes, for loading a checkpoint into."""
        raise NotImplementedError

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()

    def extra_repr(self) -> str:
        method = getattr(self._config, "method", "rtn")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._scheme_repr()}"
            + (f", method={method}" if method != "rtn" else "")
            + (", input_scale" if self.input_scale is not None else "")
        )

    def _scheme_repr(self) -> str:
        return self.config_cls.scheme

    @property
    def config(self) -> QuantConfig:
        return self._config if self._config is not None else self.config_cls()

    def weight_bytes(self) -> int:
        """Bytes of everything this layer keeps (weights, scales, zeros, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # -------------------------------------- tensor parallelism (used by pyquant.distributed)
    # ``dim`` 0 splits out_features (column-parallel), 1 splits in_features (row-parallel), into
    # ``world`` equal shards. Only the layer knows how its (packed) buffers split; the caller
    # checks ``shard_sizes_ok`` for every layer before it cuts any.

    #: True when the weight scales span whole rows of K (per output channel): a row-parallel
    #: shard quantized on its own needs the whole rows' max |w| (``from_float(row_amax=)``).
    scales_span_rows = False
    #: True when forward quantizes each activation row with a scale of its own: a row-parallel
    #: shard must quantize with the whole row's (``act_row_amax`` of each shard, reduced with
    #: max over the shards, passed as ``forward(x, act_amax=)``).
    quantizes_activation_rows = False

    def act_row_amax(self, x: torch.Tensor) -> torch.Tensor:
        """max |x| of each row of what forward quantizes (float32, x's leading shape)."""
        return self._scale_input(x.detach()).abs().amax(dim=-1).to(torch.float32)

    def _forward_act_amax(self, x: torch.Tensor, act_amax: torch.Tensor, codes_mm) -> torch.Tensor:
        # A row-parallel shard holds a slice of each row of x, so it quantizes with the whole
        # row's scale (act_amax): then the shards' partial sums add up to the unsharded result.
        # ``codes_mm(xq, xs)`` multiplies the int8 codes (no bias): see the layers' _codes_mm.
        lead = x.shape[:-1]
        x2 = self._scale_input(x).reshape(-1, x.shape[-1])
        native = x2.device.type == "cpu" and _native.available()
        quantize = _native.quantize_rows_int8 if native else formats.quantize_rows_int8
        xq, xs = quantize(x2, amax=act_amax)
        y = codes_mm(xq, xs)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def shard_axes(self, dim: int) -> dict:
        """{buffer name: the axis of that buffer that splits with ``dim``, or None where every
        shard keeps the whole buffer}. A row-parallel shard keeps the whole bias: whoever sums
        the shards' outputs adds it once."""
        raise NotImplementedError(f"{type(self).__name__} does not define shard_axes")

    @staticmethod
    def _input_scale_axes(dim: int) -> dict:
        # the per-input-channel scale of x (AWQ, SmoothQuant) splits with K
        return {"input_scale": 0 if dim == 1 else None}

    def shard_alignment(self, dim: int) -> int:
        """Every shard's size along ``dim`` must be a multiple of this."""
        return 1

    def _alignment_reason(self, dim: int) -> str:
        return "any size works"

    def shard_sizes_ok(self, dim: int, world: int) -> Optional[str]:
        """None if ``dim`` splits into ``world`` shards, else why not (with the sizes)."""
        what = ("out_features", "in_features")[dim]
        size, align = (self.out_features, self.in_features)[dim], self.shard_alignment(dim)
        if size % world or (size // world) % align:
            return (f"{what}={size} split {world} ways is {size / world:g} per shard, which "
                    f"must be a whole multiple of {align} ({self._alignment_reason(dim)})")
        return None

    def _canonical_buffers(self):
        """(name, tensor) of this layer's buffers in their canonical formats."""
        return self.named_buffers(recurse=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # torch's copy_ would cast a float tensor into an integer buffer (a float Linear's
        # `weight` into an int8 layer's codes: zeros, or garbage) without a word
        for name, mine in self._buffers.items():
            theirs = state_dict.get(prefix + name)
            if (mine is not None and isinstance(theirs, torch.Tensor)
                    and theirs.is_floating_point() != mine.is_floating_point()):
                error_msgs.append(
                    f"{prefix + name}: {type(self).__name__} keeps {mine.dtype} here and the "
                    f"state dict has {theirs.dtype}; a float model's weights go into the float "
                    f"model before it is quantized (load them, then pyquant.quantize_), and a "
                    f"quantized checkpoint into a float skeleton with pyquant.load")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def shard(self, dim: int, rank: int, world: int) -> "_QuantLinearBase":
        """A new layer of this class holding shard ``rank`` of ``world`` along ``dim``."""
        if dim not in (0, 1):
            raise ValueError(f"dim={dim!r}: use 0 (out_features) or 1 (in_features)")
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int)
                and 0 <= rank < world):
            raise ValueError(f"rank={rank!r}, world={world!r}: need 0 <= rank < world")
        why = self.shard_sizes_ok(dim, world)
        if why:
            raise ValueError(f"{type(self).__name__} cannot be split: {why}")
        k, n = self.in_features, self.out_features
        k, n = (k, n // world) if dim == 0 else (k // world, n)
        axes = self.shard_axes(dim)
        dev = next(iter(self.buffers())).device
        new = type(self).empty(k, n, self.bias is not None, self.config,
                               bias_dtype=None if self.bias is None else self.bias.dtype,
                               device=dev)
        for name, t in self._canonical_buffers():
            if name not in axes:
                raise ValueError(f"{type(self).__name__}.shard: no split rule for buffer {name!r}")
            if axes[name] is not None:
                step = t.shape[axes[name]] // world
                t = t.narrow(axes[name], rank * step, step)
            mine = getattr(new, name, None)
            if mine is None or mine.shape != t.shape:
                setattr(new, name, t.clone())
            else:
                mine.copy_(t)
        return new


class _PanelLayout:
    """Mixin of the layers that keep their weight in a CPU backend's panel layout where the
    native kernels run fastest from it: the int8 and int4 layers in 32-row panels
    (``pyquant.panels``: AVX512 without AMX), the 2:4 + int8 / int4 layers in 4-row panels
    (``pyquant.sparse_panels``: AVX512 with VNNI). The panels are then converted once, here,
    instead of on every call. ``weight_layout`` says which: "rows" (the canonical buffers) or "panels" (the same
    bytes, reordered). The layout never leaves the layer: ``state_dict`` (and so checkpoints),
    ``shard`` and moves to another device get the canonical buffers, and ``canonical(name)``
    returns one."""

    #: "rows": the buffers of _PANEL_BUFFERS hold the canonical formats; "panels": the layout.
    weight_layout = "rows"
    _PANEL_BUFFERS: tuple = ()

    def _panel_layout_applies(self, device) -> bool:
        raise NotImplementedError

    def _panels_from_rows(self, bufs: tuple) -> tuple:
        raise NotImplementedError

    def _rows_from_panels(self, bufs: tuple) -> tuple:
        raise NotImplementedError

    def _unpacked(self) -> dict:
        """{name: canonical tensor} of the buffers kept in panels (new tensors)."""
        bufs = self._rows_from_panels(tuple(self._buffers[n] for n in self._PANEL_BUFFERS))
        return dict(zip(self._PANEL_BUFFERS, bufs))

    def canonical(self, name: str) -> torch.Tensor:
        """Buffer ``name`` in its canonical format, whatever the layout it is kept in."""
        if self.weight_layout == "panels" and name in self._PANEL_BUFFERS:
            return self._unpacked()[name]
        return getattr(self, name)

    def _pack_if_fast(self):
        bufs = tuple(self._buffers.get(n) for n in self._PANEL_BUFFERS)
        if (self.weight_layout == "rows" and all(b is not None for b in bufs)
                and self._panel_layout_applies(bufs[0].device)):
            for n, t in zip(self._PANEL_BUFFERS, self._panels_from_rows(bufs)):
                self._buffers[n] = t
            self.weight_layout = "panels"
        return self

    def _to_rows(self) -> bool:
        """The canonical buffers in place again; True when they were in panels."""
        if self.weight_layout != "panels":
            return False
        self._buffers.update(self._unpacked())
        self.weight_layout = "rows"
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_layout == "panels":  # checkpoints hold the canonical formats
            destination.update((prefix + n, t) for n, t in self._unpacked().items())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._to_rows()  # the canonical buffers that the checkpoint's tensors load into
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pack_if_fast()

    def _apply(self, fn, recurse=True):
        # fn keeps a CPU integer tensor as it is (a float cast, share_memory): the layout stays;
        # otherwise (another device, meta) the canonical buffers go through it
        if self.weight_layout == "panels":
            probe = fn(torch.empty(0, dtype=torch.uint8))
            if probe.device.type != "cpu" or probe.dtype != torch.uint8:
                self._to_rows()
        super()._apply(fn, recurse)
        return self._pack_if_fast()

    def _canonical_buffers(self):
        bufs = dict(super()._canonical_buffers())
        if self.weight_layout == "panels":
            bufs.update(self._unpacked())
        return bufs.items()

    def shard(self, dim: int, rank: int, world: int):
        return super().shard(dim, rank, world)._pack_if_fast()


class Int8WeightOnlyLinear(_PanelLayout, _QuantLinearBase):
    """int8 weights, symmetric per output channel; float activations. On CPUs whose kernels
    take it, ``weight`` is kept in the panel layout (``_PanelLayout``)."""

    config_cls = Int8WeightOnly
    _PANEL_BUFFERS = ("weight",)

    def _panel_layout_applies(self, device) -> bool:
        return _panels.panel_layout_applies(self.out_features, self.in_features, device)

    def _panels_from_rows(self, bufs: tuple) -> tuple:
        return (_panels.pack_int8(bufs[0]),)

    def _rows_from_panels(self, bufs: tuple) -> tuple:
        return (_panels.unpack_int8(bufs[0]),)

    @classmethod
    def unsupported_reason(cls, linear, config):
        return (super().unsupported_reason(linear, config)
                or _checks.int8_k_reason(linear.weight.shape[1]))

    def __init__(self, in_features, out_features, bias=True, bias_dtype=None, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )

    @classmethod
    def empty(cls, in_features, out_features, bias, config, bias_dtype=None, device=None):
        return cls(in_features, out_features, bias, bias_dtype, device)._adopt(config)

    scales_span_rows = True

    def shard_axes(self, dim: int) -> dict:
        # per-output-channel scales follow the rows; a K shard keeps them whole
        return {"weight": dim, "weight_scale": 0 if dim == 0 else None,
                "bias": 0 if dim == 0 else None, **self._input_scale_axes(dim)}

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Optional[QuantConfig] = None,
                   row_amax: Optional[torch.Tensor] = None):
        """row_amax [N]: max |w| of the whole rows when ``linear`` is a row-parallel shard."""
        check_from_float_config(cls, config)
        w = linear.weight
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None,
                    None if linear.bias is None else linear.bias.dtype, w.device)
        q, s = formats.quantize_int8_per_channel(w, amax=row_amax)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(s)
        layer._copy_bias(linear)
        return layer._pack_if_fast()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = ("int8_weight_only_mm_panels" if self.weight_layout == "panels"
              else "int8_weight_only_mm")
        return self._call_op(op, self._scale_input(x), self.weight, self.weight_scale, self.bias)


def _native_codes(op: str, xq: torch.Tensor) -> bool:
    """True where ``op`` on xq's device runs the native CPU kernels, whose int8 core takes
    given codes and row scales (_native.int8_codes_mm / int4_codes_mm)."""
    return xq.device.type == "cpu" and _ops.select(op, xq.device).name == "cpu"


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """W8A8: int8 per-channel weights (the buffers of Int8WeightOnlyLinear, in the same
    layout), int8 per-token activations quantized at run time."""

    config_cls = Int8Dynamic
    quantizes_activation_rows = True

    def _codes_mm(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        # Given activation codes (the ops quantize x themselves): exact int32 products through
        # torch._int_mm where it is fast (CPU: oneDNN's int8 units, M > 2; CUDA: M > 16 and
        # K, N multiples of 8), then the epilogue of the op, acc * (xs * ws). Otherwise (decode,
        # memory-bound: the same speed) the codes go through the weight-only kernel as small
        # integers in fp32: products exact, partial sums exact below 2^24.
        if self.weight_layout == "panels":
            if _native_codes("int8_dynamic_mm_panels", xq):
                return _native.int8_codes_mm_panels(xq, xs, self.weight, self.weight_scale)
        elif _native_codes("int8_dynamic_mm", xq):
            return _native.int8_codes_mm(xq, xs, self.weight, self.weight_scale)
        w = self.canonical("weight")
        m, (n, k) = xq.shape[0], w.shape
        cuda = xq.device.type == "cuda"
        if hasattr(torch, "_int_mm") and (m > 16 and k % 8 == 0 and n % 8 == 0 if cuda
                                          else m > 2 and xq.device.type == "cpu"):
            try:
                acc = torch._int_mm(xq, w.t())
                return acc.to(torch.float32) * (xs[:, None] * self.weight_scale[None, :])
            except (RuntimeError, NotImplementedError):
                pass
        return _ops.call(
            "int8_weight_only_mm", xq.to(torch.float32), w, self.weight_scale, None,
        ) * xs[:, None]

    def forward(self, x: torch.Tensor, act_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
        if act_amax is not None:  # a row-parallel shard (pyquant.distributed)
            return self._forward_act_amax(x, act_amax, self._codes_mm)
        op = "int8_dynamic_mm_panels" if self.weight_layout == "panels" else "int8_dynamic_mm"
        return self._call_op(op, self._scale_input(x), self.weight, self.weight_scale, self.bias)


class Int4WeightOnlyLinear(_PanelLayout, _QuantLinearBase):
    """int4 group-wise weights (two codes a byte, formats.pack_int4); float activations. On
    CPUs whose kernels take it, the three weight buffers are kept in the panel layout
    (``_PanelLayout``)."""

    config_cls = Int4WeightOnly
    _PANEL_BUFFERS = ("weight_packed", "weight_scales", "weight_zeros")

    def _panel_layout_applies(self, device) -> bool:
        return _panels.int4_weight_only_panel_layout_applies(self.out_features,
                                                             self.in_features, self.group_size,
                                                             device)

    def _panels_from_rows(self, bufs: tuple) -> tuple:
        return _panels.pack_int4(*bufs, self.group_size)

    def _rows_from_panels(self, bufs: tuple) -> tuple:
        return _panels.unpack_int4(*bufs, self.group_size)

    def __init__(self, in_features, out_features, bias=True, group_size=128, symmetric=False,
                 bias_dtype=None, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        cfg = Int4WeightOnly(group_size=group_size, symmetric=symmetric)  # validates
        if in_features % group_size:
            raise ValueError(
                f"in_features={in_features} is not a multiple of group_size={group_size}"
            )
        self.group_size = cfg.group_size
        self.symmetric = cfg.symmetric
        groups = in_features // group_size
        self.register_buffer(
            "weight_packed",
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "weight_scales", torch.ones(out_features, groups, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "weight_zeros", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device)
        )

    @classmethod
    def unsupported_reason(cls, linear, config):
        why = super().unsupported_reason(linear, config)
        if why:
            return why
        k = linear.weight.shape[1]
        if k % config.group_size:
            ok = [g for g in (32, 64, 128, 256) if k % g == 0]
            hint = f"group_size={ok[-1]} would work" if ok else "pad K to a multiple of 32"
            return f"K={k} is not a multiple of group_size={config.group_size}; {hint}"
        return None

    @classmethod
    def empty(cls, in_features, out_features, bias, config, bias_dtype=None, device=None):
        return cls(in_features, out_features, bias, config.group_size, config.symmetric,
                   bias_dtype, device)._adopt(config)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Int4WeightOnly):
        check_from_float_config(cls, config)
        w = linear.weight
        layer = cls.empty(w.shape[1], w.shape[0], linear.bias is not None, config,
                          None if linear.bias is None else linear.bias.dtype, w.device)
        codes, scales, zeros = formats.quantize_int4_groupwise(w, config.group_size,
                                                               config.symmetric)
        layer.weight_packed.copy_(formats.pack_int4(codes))
        layer.weight_scales.copy_(scales)
        layer.weight_zeros.copy_(zeros)
        layer._copy_bias(linear)
        return layer._pack_if_fast()

    @property
    def config(self):
        if self._config is not None:
            return self._config
        return Int4WeightOnly(group_size=self.group_size, symmetric=self.symmetric)

    def _scheme_repr(self):
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"int4_weight_only, group_size={self.group_size}, {kind}"

    def shard_axes(self, dim: int) -> dict:
        # packed bytes, scales and zeros all split along K by whole groups (shard_alignment)
        return {"weight_packed": dim, "weight_scales": dim, "weight_zeros": dim,
                "bias": 0 if dim == 0 else None, **self._input_scale_axes(dim)}

    def shard_alignment(self, dim: int) -> int:
        # a K shard must hold whole groups (their scales and zeros) and whole bytes (two codes a
        # byte, formats.pack_int4); group_size is even, so it is the lcm of the two
        return math.lcm(self.group_size, 2) if dim == 1 else 1

    def _alignment_reason(self, dim: int) -> str:
        if dim == 0:
            return "any size works"
        return (f"group_size={self.group_size}: a shard must hold whole scale groups and whole "
                "bytes of the int4 packing (2 codes a byte)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = ("int4_weight_only_mm_panels" if self.weight_layout == "panels"
              else "int4_weight_only_mm")
        return self._call_op(
            op, self._scale_input(x), self.weight_packed, self.weight_scales, self.weight_zeros,
            self.group_size, self.bias,
        )


class Int4DynamicLinear(Int4WeightOnlyLinear):
    """W4A8: int4 group-wise weights (the buffers of Int4WeightOnlyLinear, in the same
    layout), int8 per-token activations quantized at run time
    (torch.ops.pyquant.int4_dynamic_mm)."""

    config_cls = Int4Dynamic

    def _panel_layout_applies(self, device) -> bool:
        # on AMX too: decode runs the panels' GEMV, prefill int8 tiles converted from them
        return _panels.int4_panel_layout_applies(self.out_features, self.in_features,
                                                 self.group_size, device)

    @property
    def config(self):
        if self._config is not None:
            return self._config
        return Int4Dynamic(group_size=self.group_size, symmetric=self.symmetric)

    def _scheme_repr(self):
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"int4_dynamic, group_size={self.group_size}, {kind}"

    quantizes_activation_rows = True

    def _codes_mm(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        # Given activation codes: they go through the weight-only kernel as small integers in
        # fp32 (products with int4 codes minus zeros exact, partial sums exact below 2^24), i.e.
        # the op's integer arithmetic up to the fp32 order of group scales and sums. Slower than
        # int4_dynamic_mm's int8 units at large M, so the native kernel takes the codes where
        # it runs.
        w = (self.weight_packed, self.weight_scales, self.weight_zeros)
        if self.weight_layout == "panels":
            if _native_codes("int4_dynamic_mm_panels", xq):
                return _native.int4_codes_mm_panels(xq, xs, *w, self.group_size)
            w = tuple(self.canonical(n) for n in self._PANEL_BUFFERS)
        elif _native_codes("int4_dynamic_mm", xq):
            return _native.int4_codes_mm(xq, xs, *w, self.group_size)
        return _ops.call(
            "int4_weight_only_mm", xq.to(torch.float32), *w, self.group_size, None,
        ) * xs[:, None]

    def forward(self, x: torch.Tensor, act_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
        if act_amax is not None:  # a row-parallel shard (pyquant.distributed)
            return self._forward_act_amax(x, act_amax, self._codes_mm)
        op = "int4_dynamic_mm_panels" if self.weight_layout == "panels" else "int4_dynamic_mm"
        return self._call_op(
            op, self._scale_input(x), self.weight_packed, self.weight_scales, self.weight_zeros,
            self.group_size, self.bias,
        )


LAYER_FOR_SCHEME = {
    Int8WeightOnly.scheme: Int8WeightOnlyLinear,
    Int8Dynamic.scheme: Int8DynamicLinear,
    Int4WeightOnly.scheme: Int4WeightOnlyLinear,
    Int4Dynamic.scheme: Int4DynamicLinear,
}
QUANT_LAYERS = tuple(LAYER_FOR_SCHEME.values())

# The sparse layers (2:4, unstructured, 2:4 + int8/int4) build on _QuantLinearBase; they join the
# tables here so that config.layer_cls, save and load see them like every other layer.
from . import sparse_nn as _sparse_nn  # noqa: E402

LAYER_FOR_SCHEME.update(_sparse_nn.LAYER_FOR_SCHEME)
QUANT_LAYERS = tuple(LAYER_FOR_SCHEME.values())
