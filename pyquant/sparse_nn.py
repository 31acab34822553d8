"""Sparse linear layers: 2:4 and unstructured, float or (2:4 only) with int8/int4 kept values.

Built by ``pyquant.sparsify_`` (or ``from_float`` with a keep-mask from pyquant.prune), they keep
their weights as plain buffers in the compressed formats of ``sparse_formats.py`` (checkpoints
store them as they are) and run ``forward`` as one ``torch.ops.pyquant.*`` call.
``quantize_(model, Int8WeightOnly() | Int4WeightOnly(...))`` turns a ``Sparse24Linear`` into
the combined layer through ``pyquant_quantize`` (the hook api.quantize_ calls for non-Linear
layers).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from . import _checks, formats
from . import ops as _ops  # registers torch.ops.pyquant.*; the layers' _call_op runs them
from . import sparse_formats as sf
from . import sparse_panels
from .config import (Int4WeightOnly, Int8WeightOnly, Sparse24, Sparse24Int4WeightOnly,
                     Sparse24Int8WeightOnly, Unstructured)
from .nn import _PanelLayout, _QuantLinearBase, check_from_float_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _value_dtype(config) -> torch.dtype:
    v = getattr(config, "value_dtype", None)
    return _DTYPES[v] if v is not None else torch.float32


def _with_value_dtype(config, dtype: torch.dtype):
    """The config a layer records: value_dtype made concrete, so that ``empty`` (checkpoint
    prototypes) rebuilds the same buffer dtypes."""
    name = str(dtype)[6:]
    if name not in _DTYPES:
        raise ValueError(f"weight dtype {dtype} cannot be a sparse value dtype; use one of "
                         f"{list(_DTYPES)}")
    return dataclasses.replace(config, value_dtype=name)


def _float_weight(linear: nn.Module, weight: Optional[torch.Tensor]) -> torch.Tensor:
    w = linear.weight if weight is None else weight
    return w.detach()


class _SparseBase(_QuantLinearBase):
    @property
    def config(self):
        # float values follow a cast of the model (model.bfloat16(): _FLOAT32_BUFFERS), so
        # the recorded value dtype is the values' own, or a checkpoint of the cast model
        # would name the old dtype and its load would refuse the values
        cfg = super().config
        v = self._buffers.get("weight_values")
        if (v is not None and v.dtype in _DTYPES.values() and hasattr(cfg, "value_dtype")
                and _value_dtype(cfg) != v.dtype):
            cfg = _with_value_dtype(cfg, v.dtype)
        return cfg

    @classmethod
    def _empty_from_sparse(cls, sp: "Sparse24Linear", config):
        """An empty layer of this class with the shape, bias dtype and device of ``sp``."""
        return cls.empty(sp.in_features, sp.out_features, sp.bias is not None, config,
                         None if sp.bias is None else sp.bias.dtype, sp.weight_values.device)

    def _take_sparse(self, sp: "Sparse24Linear"):
        """Copy what a 2:4 layer keeps besides its values: positions, bias, input scale."""
        self.weight_meta.copy_(sp.weight_meta)
        if sp.bias is not None:
            self.bias = sp.bias.detach().clone()
        if sp.input_scale is not None:
            self.input_scale = sp.input_scale.detach().clone()
        return self

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense float32 [N, K] (zeros where pruned; dequantized)."""
        raise NotImplementedError

    def _canonical_24(self) -> tuple:
        """(values or codes, meta) of a 2:4 + int layer in their canonical formats, unpacked
        once when the layer keeps them in panels (nn._PanelLayout)."""
        names = self._PANEL_BUFFERS
        if getattr(self, "weight_layout", "rows") == "panels":
            bufs = self._unpacked()
            return bufs[names[0]], bufs[names[1]]
        return getattr(self, names[0]), getattr(self, names[1])

    def sparsity(self) -> float:
        w = self.dense_weight()
        return float((w == 0).sum()) / max(1, w.numel())

    def pyquant_quantize(self, config):
        """(new layer, None) when ``quantize_(model, config)`` can turn this layer into a
        combined sparse + quantized one, else (None, why not)."""
        what = f"{type(self).__name__} cannot be quantized with {type(config).__name__}"
        if isinstance(self, (Sparse24Int8Linear, Sparse24Int4Linear)):
            return None, f"{what}: it is already a 2:4 + int8/int4 layer"
        if isinstance(self, Sparse24Linear):  # a dynamic config
            return None, (f"{what}: a 2:4 layer takes Int8WeightOnly() or "
                          f"Int4WeightOnly(group_size=...) (its kernels keep float activations)")
        return None, (f"{what}: of the sparse layers only a 2:4 one (Sparse24Linear) combines "
                      f"with quantization, with Int8WeightOnly() or Int4WeightOnly(group_size=...)")


def _default_meta(n: int, k: int, device) -> torch.Tensor:
    """Canonical positions (0, 1) in every group (byte 0b01_00_01_00 = 0x44; the padding bits
    of a last half byte stay 0), so an ``empty`` layer is a valid one."""
    meta = torch.full((n, sf.sparse24_meta_cols(k)), 0x44, dtype=torch.uint8)
    if k % 8 == 4 and n:
        meta[:, -1] = 0x04
    return meta.to(device)


def _check_24(linear, config) -> Optional[str]:
    k = linear.weight.shape[1]
    if k % 4:
        return f"K={k} is not a multiple of 4 (2:4 keeps 2 of every 4 consecutive weights)"
    return None


# ----------------------------------------------------------------------------- 2:4 float


class Sparse24Linear(_SparseBase):
    """2:4 sparse float weights: kept values [N, K/2] + 2-bit positions uint8 [N, ceil(K/8)]."""

    config_cls = Sparse24

    def __init__(self, in_features, out_features, bias=True, value_dtype=torch.float32,
                 bias_dtype=None, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        if in_features % 4:
            raise ValueError(f"in_features={in_features} is not a multiple of 4 (2:4)")
        self.register_buffer("weight_values", torch.zeros(
            out_features, in_features // 2, dtype=value_dtype, device=device))
        self.register_buffer("weight_meta", _default_meta(out_features, in_features, device))

    @classmethod
    def unsupported_reason(cls, linear, config):
        return super().unsupported_reason(linear, config) or _check_24(linear, config)

    @classmethod
    def empty(cls, in_features, out_features, bias, config, bias_dtype=None, device=None):
        return cls(in_features, out_features, bias, _value_dtype(config), bias_dtype,
                   device)._adopt(config)

    @classmethod
    def from_float(cls, linear: nn.Module, config: Sparse24 = Sparse24(),
                   mask: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None):
        """``mask`` bool [N, K] (2 of every 4 kept; default: magnitude); ``weight``: the float
        weight to compress instead of ``linear.weight`` (SparseGPT's updated weights)."""
        check_from_float_config(cls, config)
        w = _float_weight(linear, weight)
        dtype = _DTYPES[config.value_dtype] if config.value_dtype else linear.weight.dtype
        config = _with_value_dtype(config, dtype)
        layer = cls.empty(w.shape[1], w.shape[0], linear.bias is not None, config,
                          None if linear.bias is None else linear.bias.dtype, w.device)
        values, meta = sf.compress_24(w, mask)
        layer.weight_values.copy_(values)
        layer.weight_meta.copy_(meta)
        layer._copy_bias(linear)
        return layer

    def dense_weight(self):
        return sf.decompress_24(self.weight_values.to(torch.float32), self.weight_meta)

    def _scheme_repr(self):
        return f"sparse24, values={str(self.weight_values.dtype)[6:]}"

    def shard_axes(self, dim):
        return {"weight_values": dim, "weight_meta": dim, "bias": 0 if dim == 0 else None,
                **self._input_scale_axes(dim)}

    def shard_alignment(self, dim):
        return 8 if dim == 1 else 1  # a K shard holds whole meta bytes (8 columns of K each)

    def _alignment_reason(self, dim):
        return "any size works" if dim == 0 else "a meta byte holds the positions of 8 columns"

    def pyquant_quantize(self, config):
        if getattr(config, "method", "rtn") != "rtn":
            return None, (f"sparse layers take only method='rtn' quantization, got "
                          f"method={config.method!r}")
        if type(config) is Int8WeightOnly:
            why = _checks.int8_k_reason(self.in_features, kept=2)
            if why:
                return None, why
            return Sparse24Int8Linear.from_sparse(self, Sparse24Int8WeightOnly(
                method=self.config.method, options=self.config.options)), None
        if type(config) is Int4WeightOnly:
            half = self.in_features // 2
            if half % config.group_size:
                return None, (f"K/2={half} kept values per row are not a multiple of "
                              f"group_size={config.group_size}")
            return Sparse24Int4Linear.from_sparse(self, Sparse24Int4WeightOnly(
                group_size=config.group_size, symmetric=config.symmetric,
                method=self.config.method, options=self.config.options)), None
        return super().pyquant_quantize(config)

    def forward(self, x):
        return self._call_op(
            "sparse24_mm", self._scale_input(x), self.weight_values, self.weight_meta, self.bias,
        )


# ----------------------------------------------------------------------------- 2:4 + int8


class Sparse24Int8Linear(_PanelLayout, _SparseBase):
    """2:4 sparse, kept values int8 per output channel (scale float32 [N]); float activations.
    On CPUs whose kernels take it, values and meta are kept in 4-row panels
    (pyquant/sparse_panels.py; nn._PanelLayout)."""

    config_cls = Sparse24Int8WeightOnly
    scales_span_rows = True
    _PANEL_BUFFERS = ("weight_values", "weight_meta")

    def _panel_layout_applies(self, device) -> bool:
        return sparse_panels.layout_applies(self.out_features, self.in_features, device)

    def _panels_from_rows(self, bufs: tuple) -> tuple:
        return sparse_panels.pack(*bufs, 8)

    def _rows_from_panels(self, bufs: tuple) -> tuple:
        return sparse_panels.unpack(*bufs, 8)

    def __init__(self, in_features, out_features, bias=True, bias_dtype=None, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        if in_features % 4:
            raise ValueError(f"in_features={in_features} is not a multiple of 4 (2:4)")
        self.register_buffer("weight_values", torch.zeros(
            out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("weight_meta", _default_meta(out_features, in_features, device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))

    @classmethod
    def unsupported_reason(cls, linear, config):
        return (super().unsupported_reason(linear, config) or _check_24(linear, config)
                or _checks.int8_k_reason(linear.weight.shape[1], kept=2))

    @classmethod
    def empty(cls, in_features, out_features, bias, config, bias_dtype=None, device=None):
        return cls(in_features, out_features, bias, bias_dtype, device)._adopt(config)

    @classmethod
    def from_float(cls, linear, config=Sparse24Int8WeightOnly(), mask=None, weight=None):
        check_from_float_config(cls, config)
        return cls.from_sparse(Sparse24Linear.from_float(
            linear, Sparse24(method=config.method, options=config.options), mask, weight), config)

    @classmethod
    def from_sparse(cls, sp: Sparse24Linear, config: Sparse24Int8WeightOnly):
        layer = cls._empty_from_sparse(sp, config)
        q, s = sf.quantize_24_int8(sp.weight_values)
        layer.weight_values.copy_(q)
        layer.weight_scale.copy_(s)
        return layer._take_sparse(sp)._pack_if_fast()

    def dense_weight(self):
        values, meta = self._canonical_24()
        v = formats.dequantize_int8_per_channel(values, self.weight_scale)
        return sf.decompress_24(v, meta)

    def shard_axes(self, dim):
        return {"weight_values": dim, "weight_meta": dim,
                "weight_scale": 0 if dim == 0 else None, "bias": 0 if dim == 0 else None,
                **self._input_scale_axes(dim)}

    def shard_alignment(self, dim):
        return 8 if dim == 1 else 1

    def forward(self, x):
        op = "sparse24_int8_mm_panels" if self.weight_layout == "panels" else "sparse24_int8_mm"
        return self._call_op(
            op, self._scale_input(x), self.weight_values, self.weight_meta, self.weight_scale,
            self.bias,
        )


# ----------------------------------------------------------------------------- 2:4 + int4


class Sparse24Int4Linear(_PanelLayout, _SparseBase):
    """2:4 sparse, kept values [N, K/2] int4 group-wise along the compressed axis. On CPUs
    whose kernels take it, codes and meta are kept in 4-row panels (pyquant/sparse_panels.py;
    nn._PanelLayout)."""

    config_cls = Sparse24Int4WeightOnly
    _PANEL_BUFFERS = ("weight_packed", "weight_meta")

    def _panel_layout_applies(self, device) -> bool:
        return sparse_panels.layout_applies(self.out_features, self.in_features, device,
                                            self.group_size)

    def _panels_from_rows(self, bufs: tuple) -> tuple:
        return sparse_panels.pack(*bufs, 4)

    def _rows_from_panels(self, bufs: tuple) -> tuple:
        return sparse_panels.unpack(*bufs, 4)

    def __init__(self, in_features, out_features, bias=True, group_size=64, symmetric=False,
                 bias_dtype=None, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        if in_features % 4 or (in_features // 2) % group_size:
            raise ValueError(f"in_features={in_features}: K/2 must be a multiple of "
                             f"group_size={group_size} (and K of 4)")
        self.group_size, self.symmetric = group_size, symmetric
        g = in_features // 2 // group_size
        self.register_buffer("weight_packed", torch.zeros(
            out_features, in_features // 4, dtype=torch.uint8, device=device))
        self.register_buffer("weight_meta", _default_meta(out_features, in_features, device))
        self.register_buffer("weight_scales", torch.ones(out_features, g, dtype=torch.float32,
                                                         device=device))
        self.register_buffer("weight_zeros", torch.full((out_features, g), 8, dtype=torch.uint8,
                                                        device=device))

    @classmethod
    def unsupported_reason(cls, linear, config):
        why = super().unsupported_reason(linear, config) or _check_24(linear, config)
        if why:
            return why
        half = linear.weight.shape[1] // 2
        if half % config.group_size:
            return (f"K/2={half} kept values per row are not a multiple of "
                    f"group_size={config.group_size}")
        return None

    @classmethod
    def empty(cls, in_features, out_features, bias, config, bias_dtype=None, device=None):
        return cls(in_features, out_features, bias, config.group_size, config.symmetric,
                   bias_dtype, device)._adopt(config)

    @classmethod
    def from_float(cls, linear, config=Sparse24Int4WeightOnly(), mask=None, weight=None):
        check_from_float_config(cls, config)
        return cls.from_sparse(Sparse24Linear.from_float(
            linear, Sparse24(method=config.method, options=config.options), mask, weight), config)

    @classmethod
    def from_sparse(cls, sp: Sparse24Linear, config: Sparse24Int4WeightOnly):
        layer = cls._empty_from_sparse(sp, config)
        packed, scales, zeros = sf.quantize_24_int4(sp.weight_values, config.group_size,
                                                    config.symmetric)
        layer.weight_packed.copy_(packed)
        layer.weight_scales.copy_(scales)
        layer.weight_zeros.copy_(zeros)
        return layer._take_sparse(sp)._pack_if_fast()

    def dense_weight(self):
        packed, meta = self._canonical_24()
        v = formats.dequantize_int4_groupwise(packed, self.weight_scales, self.weight_zeros,
                                              self.group_size)
        return sf.decompress_24(v, meta)

    def shard_axes(self, dim):
        # codes, meta, scales and zeros all split along K by whole groups (shard_alignment)
        return {"weight_packed": dim, "weight_meta": dim, "weight_scales": dim,
                "weight_zeros": dim, "bias": 0 if dim == 0 else None,
                **self._input_scale_axes(dim)}

    def shard_alignment(self, dim):
        # a K shard holds whole meta bytes (8 columns), whole code bytes (4 columns: two kept
        # codes a byte) and whole groups of kept values (G kept = 2G columns)
        return math.lcm(8, 2 * self.group_size) if dim == 1 else 1

    def _alignment_reason(self, dim):
        if dim == 0:
            return "any size works"
        return (f"group_size={self.group_size} kept values span {2 * self.group_size} columns: a "
                "shard must hold whole scale groups and whole meta bytes (8 columns)")

    def _scheme_repr(self):
        return (f"sparse24_int4_weight_only, group_size={self.group_size}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}")

    def forward(self, x):
        op = "sparse24_int4_mm_panels" if self.weight_layout == "panels" else "sparse24_int4_mm"
        return self._call_op(
            op, self._scale_input(x), self.weight_packed, self.weight_meta, self.weight_scales,
            self.weight_zeros, self.group_size, self.bias,
        )


# ----------------------------------------------------------------------------- unstructured


class UnstructuredSparseLinear(_SparseBase):
    """Unstructured sparse float weights: bitmask uint8 [N, ceil(K/8)], kept values [nnz]
    row-major, row_offsets int64 [N + 1]; every row keeps unstructured_kept(K, sparsity)."""

    config_cls = Unstructured

    def __init__(self, in_features, out_features, bias=True, sparsity=0.5,
                 value_dtype=torch.float32, bias_dtype=None, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        self.sparsity = float(sparsity)
        kept = sf.unstructured_kept(in_features, sparsity)
        self.kept_per_row = kept
        # a consistent default: the first ``kept`` columns of every row
        mask = torch.zeros(out_features, in_features, dtype=torch.bool)
        mask[:, :kept] = True
        self.register_buffer("weight_bitmask", sf.pack_bitmask(mask).to(device))
        self.register_buffer("weight_values", torch.zeros(
            out_features * kept, dtype=value_dtype, device=device))
        self.register_buffer("weight_row_offsets", (torch.arange(
            out_features + 1, dtype=torch.int64) * kept).to(device))

    @classmethod
    def empty(cls, in_features, out_features, bias, config, bias_dtype=None, device=None):
        return cls(in_features, out_features, bias, config.sparsity, _value_dtype(config),
                   bias_dtype, device)._adopt(config)

    @classmethod
    def from_float(cls, linear, config: Unstructured = Unstructured(),
                   mask: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None):
        """``mask`` bool [N, K] keeping exactly unstructured_kept(K, sparsity) per row
        (default: magnitude); ``weight`` as Sparse24Linear.from_float."""
        check_from_float_config(cls, config)
        w = _float_weight(linear, weight)
        n, k = w.shape
        if mask is None:
            from .prune.masks import magnitude_mask

            mask = magnitude_mask(w, config.sparsity)
        kept = sf.unstructured_kept(k, config.sparsity)
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool {tuple(w.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        counts = mask.sum(1)
        if n and not bool((counts == kept).all()):
            r = int((counts != kept).nonzero()[0])
            raise ValueError(f"mask row {r} keeps {int(counts[r])} weights; sparsity="
                             f"{config.sparsity} keeps exactly {kept} of K={k} in every row")
        dtype = _DTYPES[config.value_dtype] if config.value_dtype else linear.weight.dtype
        config = _with_value_dtype(config, dtype)
        layer = cls.empty(k, n, linear.bias is not None, config,
                          None if linear.bias is None else linear.bias.dtype, w.device)
        bitmask, values, offsets = sf.compress_unstructured(w.to(dtype), mask.to(w.device))
        layer.weight_bitmask.copy_(bitmask)
        layer.weight_values.copy_(values)
        layer.weight_row_offsets.copy_(offsets)
        layer._copy_bias(linear)
        return layer

    def dense_weight(self):
        return sf.decompress_unstructured(self.weight_bitmask, self.weight_values.float(),
                                          self.weight_row_offsets, self.in_features)

    def _scheme_repr(self):
        return (f"unstructured, sparsity={self.sparsity:g}, "
                f"values={str(self.weight_values.dtype)[6:]}")

    def forward(self, x):
        return self._call_op(
            "sparse_unstructured_mm", self._scale_input(x), self.weight_bitmask,
            self.weight_values, self.weight_row_offsets, self.bias,
        )


LAYER_FOR_SCHEME = {
    Sparse24.scheme: Sparse24Linear,
    Unstructured.scheme: UnstructuredSparseLinear,
    Sparse24Int8WeightOnly.scheme: Sparse24Int8Linear,
    Sparse24Int4WeightOnly.scheme: Sparse24Int4Linear,
}
SPARSE_LAYERS = tuple(LAYER_FOR_SCHEME.values())


def check_loaded(buffers: dict, k: Optional[int] = None) -> Optional[str]:
    """The value invariants of a sparse layer's loaded buffers (None when fine, else what is
    wrong): canonical 2:4 positions, int8 values in [-127, 127], unstructured row offsets
    consistent with the bitmask. ``k``: in_features when known (else taken from the shapes)."""
    meta = buffers.get("weight_meta")
    if meta is not None:
        if "weight_packed" in buffers:
            kk = 4 * buffers["weight_packed"].shape[1]
        else:
            kk = 2 * buffers["weight_values"].shape[1]
        why = sf.sparse24_meta_problem(meta, k or kk)
        if why:
            return f"weight_meta: {why}"
        v = buffers.get("weight_values")
        if v is not None and v.dtype == torch.int8:
            bad = int((v == -128).sum())
            if bad:
                return (f"int8 weight_values has {bad} value(s) of -128; expected [-127, 127]")
    bm = buffers.get("weight_bitmask")
    if bm is not None:
        kk = k if k is not None else 8 * bm.shape[1]
        why = sf.unstructured_problem(bm, buffers["weight_values"],
                                      buffers["weight_row_offsets"], kk)
        if why:
            return why
    return None
