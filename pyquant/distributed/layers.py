"""Column- and row-parallel wrappers around one shard of a linear layer.

A wrapper holds ``local``, this rank's shard, built by the layer's own ``shard(dim, rank,
world)`` (pyquant layers, pyquant/nn.py: only they know how their packed buffers split) or by
``shard_linear`` below (``nn.Linear``: a plain weight matrix). The wrappers only move activations:

    ColumnParallel  y_r = local(x)            x whole on every rank; y_r = columns
                                              [r*N/W, (r+1)*N/W) of y; all_gather only when
                                              ``gather_output`` (the last layer of a chain)
    RowParallel     y = sum_r local(x_r) + b  x_r = columns [r*K/W, (r+1)*K/W) of x (the output
                                              of a ColumnParallel, or cut here from a whole x);
                                              the partial sums are all-reduced in fp32, then the
                                              bias is added once, on the reduced sum

A layer that quantizes each activation row with its own scale (``quantizes_activation_rows``,
e.g. Int8DynamicLinear) would see only a slice of each row in a RowParallel: the wrapper reduces
the rows' max |x| over the ranks (all_reduce MAX of M floats) and passes it as
``act_amax``, so every rank uses the whole row's scale and the result equals the unsharded
layer's up to the fp32 order of the sum.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import nn as qnn

COLWISE, ROWWISE = 0, 1  # the dim of the layer that splits: out_features, in_features


def is_pyquant_layer(m) -> bool:
    return isinstance(m, qnn._QuantLinearBase)


def is_linear(m) -> bool:
    """nn.Linear or a pyquant layer (shardable or not)."""
    return isinstance(m, nn.Linear) or is_pyquant_layer(m)


def is_shardable(m) -> bool:
    """nn.Linear, or a pyquant layer that says how its buffers split (the sparse layers, whose
    compressed rows are not split yet, do not)."""
    return isinstance(m, nn.Linear) or (
        is_pyquant_layer(m) and type(m).shard_axes is not qnn._QuantLinearBase.shard_axes)


def shard_sizes_ok(m: nn.Module, dim: int, world: int) -> Optional[str]:
    """None when ``m`` splits into ``world`` shards along ``dim``, else why not."""
    if is_pyquant_layer(m):
        return m.shard_sizes_ok(dim, world)
    what = ("out_features", "in_features")[dim]
    size = (m.out_features, m.in_features)[dim]
    if size % world:
        return f"{what}={size} does not split {world} ways"
    return None


def shard_linear(m: nn.Linear, dim: int, rank: int, world: int) -> nn.Linear:
    """Shard ``rank`` of ``world`` of a float nn.Linear along ``dim`` (a row-parallel shard
    gets no bias: RowParallel adds it after the sum)."""
    w = m.weight
    n, k = w.shape
    step = (n, k)[dim] // world
    has_bias = m.bias is not None and dim == COLWISE
    # built on meta then given its tensors: no random init of a throwaway weight
    new = nn.Linear(k if dim == COLWISE else step, step if dim == COLWISE else n, bias=has_bias,
                    device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.detach().narrow(dim, rank * step, step).clone(),
                              requires_grad=w.requires_grad)
    if has_bias:
        new.bias = nn.Parameter(m.bias.detach().narrow(0, rank * step, step).clone(),
                                requires_grad=m.bias.requires_grad)
    return new


def shard_layer(m: nn.Module, dim: int, rank: int, world: int) -> nn.Module:
    if is_pyquant_layer(m):
        return m.shard(dim, rank, world)
    return shard_linear(m, dim, rank, world)


def shard_axes(m: nn.Module, dim: int) -> dict:
    """{tensor name of the *unsharded* layer: axis that splits with ``dim``, or None}."""
    if is_pyquant_layer(m):
        return m.shard_axes(dim)
    return {"weight": dim, "bias": 0 if dim == COLWISE else None}


class CollectiveLog:
    """The collectives the parallel wrappers issued while recording (``record_collectives``):
    one ``(name, numel, t_start, t_end)`` per call, times from ``time.perf_counter()`` (a
    clock every process on one host shares, so the ranks' logs line up there)."""

    def __init__(self):
        self.calls: list = []


_log: Optional[CollectiveLog] = None


@contextlib.contextmanager
def record_collectives() -> Iterator[CollectiveLog]:
    """Log every collective the parallel wrappers of this process issue inside the block; a
    ``perf_counter`` pair per call costs well under a microsecond."""
    global _log
    prev, _log = _log, CollectiveLog()
    try:
        yield _log
    finally:
        _log = prev


def _collective(name: str, fn, t: torch.Tensor, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)``: a torch.distributed collective moving ``t``; logged when
    recording."""
    if _log is None:
        fn(*args, **kwargs)
        return
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    _log.calls.append((name, t.numel(), t0, time.perf_counter()))


def reduce_over_ranks(y: torch.Tensor, op: str, world: int, group=None) -> torch.Tensor:
    """The sum ("sum") or maximum ("max") of y over the ``world`` ranks of ``group``. gloo's
    all_reduce of a small tensor is latency-bound (its ring takes two steps even for two ranks:
    a 16 KiB fp32 row took ~0.5 ms median on a 2-core VM, an all_gather of it ~0.3 ms), so
    small tensors on a CPU group are gathered in one step and reduced here, in rank order (the
    same result on every rank). In the tensor-parallel demo at M = 1 the time spent in the
    collectives after the last rank arrived fell from 5.9-6.0 to 2.6 ms a forward."""
    if (y.device.type == "cpu" and y.numel() * world <= GATHER_REDUCE_MAX_NUMEL and
            dist.get_backend(group) == "gloo"):
        parts = [torch.empty_like(y) for _ in range(world)]
        _collective(f"all_gather_{op}", dist.all_gather, y, parts, y, group=group)
        out = parts[0]
        for p in parts[1:]:
            out = out + p if op == "sum" else torch.maximum(out, p)
        return out
    _collective(f"all_reduce_{op}", dist.all_reduce, y, y,
                op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return y


def gather_last_dim(y: torch.Tensor, world: int, group=None) -> torch.Tensor:
    """The ranks' y concatenated along the last dim, in rank order."""
    y = y.contiguous()
    parts = [torch.empty_like(y) for _ in range(world)]
    _collective("all_gather", dist.all_gather, y, parts, y, group=group)
    return torch.cat(parts, dim=-1)


def replay_collective(name: str, numel: int, group=None) -> None:
    """Issue the collective that a ``CollectiveLog`` entry ``(name, numel, ...)`` records, on a
    zero fp32 tensor of that size, through the same code path as the wrappers (to time it
    alone)."""
    kind, _, op = name.rpartition("_")
    if name != "all_gather" and (kind not in ("all_gather", "all_reduce") or
                                 op not in ("sum", "max")):
        raise ValueError(f"unknown collective {name!r}: the wrappers issue all_gather, "
                         "all_gather_sum, all_gather_max, all_reduce_sum and all_reduce_max")
    world = dist.get_world_size(group)
    y = torch.zeros(numel)
    if name == "all_gather":
        gather_last_dim(y, world, group)
    else:
        reduce_over_ranks(y, op, world, group)


class _SharedGroup:
    """Holds a process group: a process group cannot be copied, so copies of a module share it."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _Parallel(nn.Module):
    def __init__(self, local: nn.Module, dim: int, in_features: int, out_features: int,
                 rank: int, world: int, group):
        super().__init__()
        self.local = local
        self.dim = dim
        self.in_features, self.out_features = in_features, out_features  # of the whole layer
        self.rank, self.world = rank, world
        self._group = _SharedGroup(group)

    @property
    def group(self):
        return self._group.group

    def _style(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self._style()}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}/{self.world}")

    def source_names(self) -> dict:
        """{name in this module's state_dict: (name in the unsharded layer's, axis or None)}:
        where each of this rank's tensors comes from in a checkpoint of the unsharded model."""
        raise NotImplementedError


class ColumnParallel(_Parallel):
    """Output-feature shard: y_r = local(x) is this rank's slice of y (see the module doc)."""

    def __init__(self, local, in_features, out_features, rank, world, group,
                 gather_output: bool = False, axes: Optional[dict] = None):
        super().__init__(local, COLWISE, in_features, out_features, rank, world, group)
        self.gather_output = bool(gather_output)
        self._axes = dict(axes or {})

    def _style(self):
        return "colwise_gather" if self.gather_output else "colwise"

    def source_names(self):
        return {f"local.{k}": (k, ax) for k, ax in self._axes.items()}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.local(x, *args, **kwargs)
        if not self.gather_output or self.world == 1:
            return y
        return gather_last_dim(y, self.world, self.group)


class RowParallel(_Parallel):
    """Input-feature shard: partial sums all-reduced, bias added once (see the module doc)."""

    def __init__(self, local, bias: Optional[torch.Tensor], in_features, out_features, rank,
                 world, group, axes: Optional[dict] = None):
        super().__init__(local, ROWWISE, in_features, out_features, rank, world, group)
        if bias is None:
            self.bias = None
        elif isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.register_buffer("bias", bias)
        self._axes = dict(axes or {})

    def _style(self):
        return "rowwise"

    def source_names(self):
        out = {f"local.{k}": (k, ax) for k, ax in self._axes.items() if k != "bias"}
        if self.bias is not None:
            out["bias"] = ("bias", None)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.local.in_features
        if x.shape[-1] == self.in_features and k != self.in_features:
            x = x.narrow(-1, self.rank * k, k)  # a whole x (no ColumnParallel before this one)
        elif x.shape[-1] != k:
            raise ValueError(
                f"RowParallel: x has {x.shape[-1]} input features; this shard takes {k} (rank "
                f"{self.rank} of {self.world}) or the whole layer's {self.in_features}")
        quantized = is_pyquant_layer(self.local)
        kwargs = {}
        if getattr(self.local, "quantizes_activation_rows", False):
            amax = self.local.act_row_amax(x).contiguous()
            if self.world > 1:
                amax = reduce_over_ranks(amax, "max", self.world, self.group)
            kwargs["act_amax"] = amax
        # pyquant kernels compute in fp32 anyway: sum the partials in fp32, round once
        y = self.local(x.to(torch.float32) if quantized else x, **kwargs).contiguous()
        if self.world > 1:
            y = reduce_over_ranks(y, "sum", self.world, self.group)
        if self.bias is not None:
            y = y + (self.bias.to(y.dtype) if quantized else self.bias)
        return y.to(x.dtype)


# RowParallel on gloo: tensors of at most this many elements (times the world size) are
# all-gathered and reduced locally instead of all-reduced (reduce_over_ranks).
GATHER_REDUCE_MAX_NUMEL = 1 << 16

PARALLEL_TYPES = (ColumnParallel, RowParallel)


def wrap(m: nn.Module, style: str, rank: int, world: int, group) -> _Parallel:
    """Cut ``m`` (already checked by plan.check) and wrap its shard."""
    k, n = m.in_features, m.out_features
    if style in ("colwise", "colwise_gather"):
        axes = shard_axes(m, COLWISE)
        local = shard_layer(m, COLWISE, rank, world)
        return ColumnParallel(local, k, n, rank, world, group,
                              gather_output=style == "colwise_gather", axes=axes)
    if style == "rowwise":
        axes = shard_axes(m, ROWWISE)
        local = shard_layer(m, ROWWISE, rank, world)
        if is_pyquant_layer(local):
            bias = local.bias  # the shard keeps the whole bias: it moves here, added once
            local.bias = None
        elif m.bias is not None:
            bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
        else:
            bias = None
        return RowParallel(local, bias, k, n, rank, world, group, axes=axes)
    raise ValueError(f"unknown style {style!r}")


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's tensors (weights, scales, zeros, biases), whole or shard."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, qnn._QuantLinearBase, *PARALLEL_TYPES)):
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                total += t.numel() * t.element_size()
    return total
