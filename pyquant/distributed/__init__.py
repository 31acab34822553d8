"""Tensor-parallel inference of (quantized) models over ``torch.distributed``.

    torchrun --nproc-per-node 2 my_script.py          # or multi-host: see docs/distributed.md

    import torch.distributed as dist, pyquant, pyquant.distributed as tp
    dist.init_process_group()                          # gloo on CPU, NCCL on GPUs
    model = ...; pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=128))
    tp.tensor_parallel_(model)                         # each rank keeps ~1/world of the linears

or, without ever holding the whole model on a rank: ``pyquant.save`` the quantized model once,
then on every rank ``tp.load_sharded(skeleton, path)`` reads only that rank's slices.

This package does not know packed layouts: it asks each layer how it splits (``shard_axes``,
``shard_alignment``, ``shard``: pyquant/nn.py), checks every layer of the plan before it cuts
any, and moves activations with ``torch.distributed`` collectives (layers.py). Plans: plan.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import api as _api
from ..config import QuantConfig
from . import plan as _plan
from .layers import (PARALLEL_TYPES, CollectiveLog, ColumnParallel, RowParallel, linear_bytes,
                     record_collectives, wrap)
from .plan import STYLES, Plan, auto_plan

__all__ = ["CollectiveLog", "ColumnParallel", "RowParallel", "Plan", "STYLES",
           "TensorParallelReport", "auto_plan", "linear_bytes", "load_sharded", "quantize_",
           "rank_and_world", "record_collectives", "tensor_parallel_"]


@dataclass
class TensorParallelReport:
    """What ``tensor_parallel_`` did on this rank."""

    rank: int
    world: int
    layers: dict = field(default_factory=dict)  # fqn -> style
    bytes_before: int = 0  # linear layers' tensors on this rank, before and after
    bytes_after: int = 0

    def __str__(self) -> str:
        n = {s: sum(v == s for v in self.layers.values()) for s in STYLES[:3]}
        return (f"rank {self.rank}/{self.world}: sharded {len(self.layers)} linear layer(s) "
                f"({n['colwise']} colwise, {n['colwise_gather']} colwise_gather, "
                f"{n['rowwise']} rowwise); linear weights {self.bytes_before / 2**20:.2f} MiB "
                f"-> {self.bytes_after / 2**20:.2f} MiB on this rank")


def rank_and_world(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: run under torchrun (or set RANK, WORLD_SIZE, "
            "MASTER_ADDR, MASTER_PORT) and call torch.distributed.init_process_group() first")
    return dist.get_rank(group), dist.get_world_size(group)


def _apply(model: nn.Module, plan: Plan, rank: int, world: int, group) -> dict:
    """Cut and wrap every layer of the (already checked) plan; divide attention attributes."""
    done: dict[int, nn.Module] = {}  # a module shared under two names is cut once
    owners = _api.parameter_owners(model)
    for fqn, style in plan.layers.items():
        m = model.get_submodule(fqn)
        new = done.get(id(m))
        if new is None:
            new = done[id(m)] = wrap(m, style, rank, world, group)
            # what keeps the whole layer float in pyquant.quantize_ (a weight tied to an
            # embedding, ...) keeps its shard float in quantize_ below: the cut unties the
            # shard, and "shard, then quantize" must give the layers "quantize, then shard" does
            new.quantize_skip = (_api.structural_skip_reason(model, fqn, m, owners)
                                 if isinstance(m, nn.Linear) else None)
        _api._set_child(model, fqn, new)
    for attn, attrs in plan.attention.items():
        mod = model.get_submodule(attn)
        for a, v in attrs.items():
            setattr(mod, a, v // world)
    return dict(plan.layers)


def tensor_parallel_(model: nn.Module, plan: Union[str, dict, Plan] = "auto",
                     group=None) -> TensorParallelReport:
    """Shard ``model`` in place over the ranks of ``group`` (the default group: None).

    ``plan``: "auto" (Llama- and BERT-style blocks, see plan.py) or {module fqn or pattern:
    "colwise" | "colwise_gather" | "rowwise" | "replicate"}. Every layer is checked (sizes,
    int4 groups and packing, head counts) before any is cut, and no collective is called here:
    a plan that does not fit raises one ValueError naming the layers, their sizes and the world
    sizes that would work, and leaves the model as it was. Every rank must call this with the
    same model and plan. Returns this rank's report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rank, world = rank_and_world(group)
    resolved = _plan.resolve(model, plan)
    _plan.check(model, resolved, world)
    report = TensorParallelReport(rank, world, bytes_before=linear_bytes(model))
    with torch.no_grad():
        report.layers = _apply(model, resolved, rank, world, group)
    report.bytes_after = linear_bytes(model)
    return report


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None):
    """``pyquant.quantize_`` for a float model that ``tensor_parallel_`` already sharded
    ("shard, then quantize"): every shard becomes exactly the shard of the quantized whole
    layer. Where a layer's weight scales span whole rows (int8 per output channel) a row-parallel
    shard is quantized with the rows' max |w| reduced over the ranks (one all_reduce MAX).
    Layers that are not sharded are quantized by ``pyquant.quantize_``. Returns its report."""
    from ..config import SparseConfig

    if isinstance(config, SparseConfig):
        raise TypeError(
            f"{type(config).__name__} is a sparsity config: prune the whole model before "
            f"sharding it (pyquant.sparsify_, then tensor_parallel_ or save + load_sharded); "
            f"tp.quantize_ quantizes the shards of a float model")
    if getattr(config, "method", "rtn") != "rtn":
        raise NotImplementedError(
            f"{type(config).__name__}(method={config.method!r}): calibrate the whole model "
            "before sharding it (quantize_, then tensor_parallel_ or save + load_sharded)")
    layer_cls = config.layer_cls
    report = _api.SwapReport(config)
    todo, misfit = [], []
    for fqn, m in list(model.named_modules()):
        if not isinstance(m, PARALLEL_TYPES) or not isinstance(m.local, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(m.local, fqn):
            report.skipped.append((fqn, "rejected by filter_fn"))
            continue
        why = getattr(m, "quantize_skip", None)
        if why:
            report.skipped.append((fqn, why))
            continue
        why = layer_cls.unsupported_reason(m.local, config)
        if why:
            whole = nn.Linear(m.in_features, m.out_features, bias=False, device="meta",
                              dtype=m.local.weight.dtype)
            if layer_cls.unsupported_reason(whole, config) is None:
                misfit.append(f"{fqn} ({m.in_features} x {m.out_features} cut {m._style()} "
                              f"over {m.world}; rank {m.rank}'s shard: {why})")
            else:  # the whole layer would stay float too: skipped alike
                report.skipped.append((fqn, f"shard of rank {m.rank}: {why}"))
            continue
        todo.append((fqn, m))
    if misfit:  # before any layer changes, as quantize-then-shard refuses the same cut
        raise ValueError(
            f"tp.quantize_ with {type(config).__name__}: the whole layer fits the config but "
            f"its shard does not: {'; '.join(misfit)}. Shard over a world size whose shards "
            f"fit, pick a group size that divides them, or quantize before sharding "
            f"(pyquant.quantize_, then tensor_parallel_ or save + load_sharded)")
    with torch.no_grad():
        for fqn, m in todo:
            kwargs = {}
            if isinstance(m, RowParallel) and getattr(layer_cls, "scales_span_rows", False):
                amax = m.local.weight.detach().abs().amax(dim=1).to(torch.float32).contiguous()
                if m.world > 1:
                    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=m.group)
                kwargs["row_amax"] = amax
            before = linear_bytes(m.local)
            m.local = layer_cls.from_float(m.local, config, **kwargs)
            report.swapped.append(fqn)
            report.bytes_before += before
            report.bytes_after += linear_bytes(m.local)
    shards = {f"{fqn}.local" for fqn, m in model.named_modules() if isinstance(m, PARALLEL_TYPES)}

    def unsharded(mod, fqn):  # the shards were handled (or skipped, with a reason) above
        return fqn not in shards and (filter_fn is None or filter_fn(mod, fqn))

    rest = _api.quantize_(model, config, unsharded)
    report.swapped += rest.swapped
    report.skipped += [(f, why) for f, why in rest.skipped if f not in shards]
    report.bytes_before += rest.bytes_before
    report.bytes_after += rest.bytes_after
    return report


from .load import load_sharded  # noqa: E402  (load.py uses _apply above)
