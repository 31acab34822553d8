"""Quantized linear layers. Each is built from a float ``nn.Linear`` by ``from_float`` (pure
PyTorch quantization from ``formats``), keeps its tensors as plain buffers in the canonical
formats (so ``state_dict`` round-trips exactly and checkpoints are backend-neutral) and runs
``forward`` as one ``torch.ops.pyquant.*`` call."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import formats
from . import ops as _ops  # noqa: F401  (registers torch.ops.pyquant.*)
from .config import Int4WeightOnly, Int8Dynamic, Int8WeightOnly, QuantConfig


class _QuantLinearBase(nn.Module):
    config_cls: type = QuantConfig

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

    @classmethod
    def unsupported_reason(cls, linear: nn.Module, config: QuantConfig) -> Optional[str]:
        """None if ``linear`` can become this layer, else why not (shown in the report)."""
        w = getattr(linear, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return "no 2-D weight"
        if not w.is_floating_point():
            return f"weight dtype {w.dtype} is not a float dtype"
        if w.shape[0] == 0 or w.shape[1] == 0:
            return f"empty weight {tuple(w.shape)}"
        return None

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config, bias_dtype=None,
              device=None):
        """An uninitialized layer of the right shapes, for loading a checkpoint into."""
        raise NotImplementedError

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._scheme_repr()}"
        )

    def _scheme_repr(self) -> str:
        return self.config_cls.scheme

    @property
    def config(self) -> QuantConfig:
        return self.config_cls()

    def weight_bytes(self) -> int:
        """Bytes of everything this layer keeps (weights, scales, zeros, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8WeightOnlyLinear(_QuantLinearBase):
    """int8 weights, symmetric per output channel; float activations."""

    config_cls = Int8WeightOnly

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
        return cls(in_features, out_features, bias, bias_dtype, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Optional[QuantConfig] = None):
        w = linear.weight
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None,
                    None if linear.bias is None else linear.bias.dtype, w.device)
        q, s = formats.quantize_int8_per_channel(w)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(s)
        layer._copy_bias(linear)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pyquant.int8_weight_only_mm(x, self.weight, self.weight_scale, self.bias)


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """W8A8: int8 per-channel weights, int8 per-token activations quantized at run time."""

    config_cls = Int8Dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pyquant.int8_dynamic_mm(x, self.weight, self.weight_scale, self.bias)


class Int4WeightOnlyLinear(_QuantLinearBase):
    """int4 group-wise weights (two codes a byte, formats.pack_int4); float activations."""

    config_cls = Int4WeightOnly

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
                   bias_dtype, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Int4WeightOnly):
        w = linear.weight
        layer = cls.empty(w.shape[1], w.shape[0], linear.bias is not None, config,
                          None if linear.bias is None else linear.bias.dtype, w.device)
        codes, scales, zeros = formats.quantize_int4_groupwise(w, config.group_size,
                                                               config.symmetric)
        layer.weight_packed.copy_(formats.pack_int4(codes))
        layer.weight_scales.copy_(scales)
        layer.weight_zeros.copy_(zeros)
        layer._copy_bias(linear)
        return layer

    @property
    def config(self):
        return Int4WeightOnly(group_size=self.group_size, symmetric=self.symmetric)

    def _scheme_repr(self):
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"int4_weight_only, group_size={self.group_size}, {kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pyquant.int4_weight_only_mm(
            x, self.weight_packed, self.weight_scales, self.weight_zeros, self.group_size,
            self.bias,
        )


LAYER_FOR_SCHEME = {
    Int8WeightOnly.scheme: Int8WeightOnlyLinear,
    Int8Dynamic.scheme: Int8DynamicLinear,
    Int4WeightOnly.scheme: Int4WeightOnlyLinear,
}
QUANT_LAYERS = tuple(LAYER_FOR_SCHEME.values())
