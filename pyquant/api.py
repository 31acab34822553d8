"""quantize_: walk any module tree and swap every eligible nn.Linear for a quantized layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

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

    def __str__(self) -> str:
        lines = [
            f"{type(self.config).__name__}: swapped {len(self.swapped)} linear layer(s), "
            f"skipped {len(self.skipped)}; linear weights {self.bytes_before / 2**20:.2f} MiB -> "
            f"{self.bytes_after / 2**20:.2f} MiB"
        ]
        for fqn, why in self.skipped:
            lines.append(f"  skipped {fqn or '<root>'}: {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"SwapReport(config={self.config!r}, swapped={len(self.swapped)}, "
                f"skipped={len(self.skipped)})")


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tensor_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> SwapReport:
    """Replace, in place, every ``nn.Linear`` of ``model`` that ``config`` supports (and that
    ``filter_fn(module, fqn)`` accepts) with the config's quantized layer. Returns a report."""
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a pyquant config such as pyquant.Int8WeightOnly(), "
            f"got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError(
            "quantize_ swaps layers inside a model and cannot replace the model object itself; "
            "wrap it (nn.Sequential(linear)) or use "
            f"{config.layer_cls.__name__}.from_float(linear, config)"
        )
    layer_cls = config.layer_cls
    report = SwapReport(config)
    targets = []
    # remove_duplicate=False: a Linear shared by two parents must be swapped in both places
    # (with one quantized layer), or the model would stay half float.
    for fqn, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(m, fqn):
            report.skipped.append((fqn, "rejected by filter_fn"))
            continue
        why = layer_cls.unsupported_reason(m, config)
        if why:
            report.skipped.append((fqn, why))
            continue
        targets.append((fqn, m))
    done: dict[int, nn.Module] = {}
    with torch.no_grad():
        for fqn, m in progress(targets, desc=f"quantize {config.scheme}"):
            new = done.get(id(m))
            if new is None:
                new = done[id(m)] = layer_cls.from_float(m, config)
                report.bytes_before += _tensor_bytes(m)
                report.bytes_after += _tensor_bytes(new)
            _set_child(model, fqn, new)
            report.swapped.append(fqn)
    return report
