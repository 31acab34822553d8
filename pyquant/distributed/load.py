"""load_sharded: every rank reads only its own slices of one ``pyquant.save`` checkpoint.

The checkpoint is the ordinary one of the unsharded model (pyquant/io.py). Each rank

1. validates the header against its skeleton exactly as ``pyquant.load`` does (io._plan);
2. puts meta-device prototypes of the quantized layers into the skeleton (no memory), checks
   the plan on them and cuts them (still on meta): the sizes and alignment of every layer are
   checked before anything is cut or read;
3. asks each shard where its tensors come from (``source_names``: the unsharded tensor and the
   axis it splits along, from the layer's ``shard_axes``) and reads only that part of each
   tensor: one contiguous byte range for a split along axis 0 (column-parallel weights, scales,
   biases), one range per row for a split along a later axis (row-parallel weights: each row's
   K slice); replicated tensors are read whole (io._read_tensor_parts);
4. checks the values the kernels rely on (io._check_values) and assigns the tensors.
"""
from __future__ import annotations

import os
import warnings
from typing import Union

import torch
import torch.distributed as dist
from torch import nn

from .. import io as _io
from ..api import _set_child
from . import _apply, rank_and_world, TensorParallelReport
from . import plan as _plan
from .layers import PARALLEL_TYPES, linear_bytes


def _default_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_sharded(model: nn.Module, path: Union[str, "os.PathLike[str]"],
                 plan: Union[str, dict, "_plan.Plan"] = "auto", group=None, strict: bool = True,
                 device=None) -> TensorParallelReport:
    """Load this rank's shard of the ``pyquant.save`` checkpoint ``path`` into ``model``, a
    float skeleton of the unsharded model (ideally built under ``torch.device("meta")``: then
    no rank ever allocates a whole layer), and make it tensor-parallel with ``plan`` as
    ``tensor_parallel_`` does. ``device``: where the tensors go (default: the current CUDA
    device under NCCL, else the CPU). Returns this rank's report."""
    _io._check_host()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rank, world = rank_and_world(group)
    device = torch.device(device) if device is not None else _default_device(group)
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            entries, meta, data_start = _io._read_header(f, size, path)
            specs, aliases = _io._read_metadata(meta, entries, path)
            model_sd = model.state_dict(keep_vars=True)
            expected, quant_keys = _io._plan(model, model_sd, specs, entries, aliases, path,
                                             strict)
        except (ValueError, MemoryError, OSError):
            raise
        except Exception as e:
            raise _io._err(path, f"corrupt or truncated checkpoint ({type(e).__name__}: {e})") \
                from e
        linears = set(specs) | {fqn for fqn, m in model.named_modules()
                                if isinstance(m, nn.Linear)}
        whole_bytes = sum(e - b for key, (_, _, b, e) in entries.items()
                          if key.rpartition(".")[0] in linears)
        originals = {}
        try:
            for fqn, (config, k, n, bias, bias_dtype) in specs.items():
                originals[fqn] = model.get_submodule(fqn)
                _set_child(model, fqn, config.layer_cls.empty(
                    k, n, bias, config, bias_dtype=bias_dtype, device="meta"))
            resolved = _plan.resolve(model, plan)
            _plan.check(model, resolved, world)
        except BaseException:
            for fqn, old in originals.items():  # leave the skeleton as it was
                _set_child(model, fqn, old)
            raise
        report = TensorParallelReport(rank, world, bytes_before=whole_bytes)
        with torch.no_grad():
            report.layers = _apply(model, resolved, rank, world, group)
        tp_sd = model.state_dict(keep_vars=True)
        source = {key: (key, None) for key in tp_sd}
        for fqn, m in model.named_modules():
            if isinstance(m, PARALLEL_TYPES):
                for name, (orig, axis) in m.source_names().items():
                    if f"{fqn}.{name}" in source:
                        part = None if axis is None else (axis, rank, world)
                        source[f"{fqn}.{name}"] = (f"{fqn}.{orig}", part)
        wanted: dict = {}  # stored key -> the parts read of it
        for key, (orig, part) in list(source.items()):
            stored = aliases.get(orig, orig)
            if stored not in entries:
                del source[key]  # absent from the file: strict=False allowed it (io._plan)
                continue
            source[key] = (stored, part)
            wanted.setdefault(stored, set()).add(part)
        # a stored tensor wanted both whole and in part (a tied, sharded lm_head) is read whole
        reads = {k: next(iter(p)) if len(p) == 1 else None for k, p in wanted.items()}
        try:
            tensors = _io._read_tensor_parts(f, data_start, entries, reads, path)
        except (ValueError, MemoryError, OSError):
            raise
        except Exception as e:
            raise _io._err(path, f"corrupt or truncated checkpoint ({type(e).__name__}: {e})") \
                from e
    _io._check_values(tensors, aliases, quant_keys, path)
    sd, first = {}, {}
    for key, (stored, part) in source.items():
        t = tensors[stored]
        if reads[stored] is None and part is not None:
            axis, index, parts = part
            step = t.shape[axis] // parts
            t = t.narrow(axis, index * step, step).contiguous()
        t = t.to(device)
        # as pyquant.load: tensors stored once share memory only where the skeleton ties them
        prev = first.setdefault((stored, part), key)
        if prev != key and tp_sd[prev] is not tp_sd[key]:
            t = t.clone()
        sd[key] = t
    try:
        model.load_state_dict(sd, strict=strict, assign=True)
    except RuntimeError as e:
        raise _io._err(path, f"could not load into the model: {e}") from e
    from .._hugepages import place_module
    from ..nn import _QuantLinearBase

    for m in model.modules():  # the assigned weights as decode streams them fastest
        if isinstance(m, _QuantLinearBase):
            place_module(m)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        warnings.warn(f"load_sharded({path}): {len(left)} tensor(s) are still on the meta device "
                      f"(not in the checkpoint, e.g. non-persistent buffers): {left[:5]}; "
                      "initialize them before use", RuntimeWarning, stacklevel=2)
    report.bytes_after = linear_bytes(model)
    return report
