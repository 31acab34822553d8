"""Checkpoints: ``save(model, path)`` and ``load(model, path)`` in the safetensors format.

Layout (the safetensors format, so the ``safetensors`` package can read our files too)::

    u64 little-endian N | N bytes of UTF-8 JSON header (space-padded) | data section
    header = {"__metadata__": {str: str, ...},
              "<state_dict key>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}

Offsets are relative to the data section. Tensors are row-major and little-endian, packed back to
back, largest element size first (so every tensor starts aligned to its element size).
Dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL. ``__metadata__`` holds:

    format           "pyquant"
    format_version   "1"
    pyquant_version  pyquant.__version__ of the writer
    layers           JSON {fqn: {"config": QuantConfig.to_dict(), "in_features": K,
                     "out_features": N, "bias": bool, "bias_dtype": "float32" | null}}
    aliases          JSON {state_dict key: stored key}; present only when some exist

Tied tensors (state_dict keys that view the same memory with the same shape, stride and dtype,
e.g. tied embeddings) are stored once and listed in ``aliases``; other partial overlaps are
written as separate copies. Plain safetensors readers therefore see only the stored keys.

``load`` checks the whole file against the model before it changes the model or lets a tensor
reach a kernel; every problem is a ``ValueError`` naming the file, the tensor or layer, and what
was expected versus found. No pickle anywhere.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import uuid
import warnings
from collections import Counter
from typing import Union

import torch
from torch import nn

from . import nn as qnn
from .api import is_conv1d
from .config import config_from_dict

PathLike = Union[str, "os.PathLike[str]"]
MAX_HEADER_BYTES = 100 * 2**20  # the limit of the reference safetensors reader
FORMAT, FORMAT_VERSION = "pyquant", "1"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_BIAS_DTYPES = {str(d)[6:]: d for d in (torch.float32, torch.float16, torch.bfloat16,
                                         torch.float64)}


def _err(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_host() -> None:  # raw bytes go straight between file and tensor memory
    if sys.byteorder != "little":
        raise NotImplementedError("pyquant checkpoints need a little-endian host")


def save(model: nn.Module, path: PathLike, report=None) -> None:
    """Write ``model.state_dict()`` plus the quantized layers' configs to one safetensors file,
    atomically (a temporary file in the same directory, then ``os.replace``).

    When the model was quantized with calibration data, ``quantize_`` left its accuracy report
    on it (``model.pyquant_accuracy``); it is written beside the checkpoint as
    ``<path>.report.json`` (see ``pyquant.calibrate.report``). ``report=`` passes one explicitly
    (an ``AccuracyReport`` or the ``SwapReport`` that holds it). A stale report file of an
    earlier save to the same path is removed when there is none now."""
    from . import __version__

    _check_host()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _uncompiled(model)
    path = os.fspath(path)
    from .nn import _QuantLinearBase

    if isinstance(model, _QuantLinearBase):
        raise ValueError(
            f"cannot save {path}: the model is itself a {type(model).__name__}, and pyquant.load "
            "swaps layers inside a model; save a module that holds it, e.g. "
            "torch.nn.Sequential(layer), and load into torch.nn.Sequential(nn.Linear(...))")
    sharded = next((fqn for fqn, m in model.named_modules()
                    if type(m).__module__ == "pyquant.distributed.layers"), None)
    if sharded is not None:
        raise ValueError(
            f"cannot save {path}: the model is tensor-parallel ({sharded or '<root>'} is a "
            f"{type(model.get_submodule(sharded)).__name__}) and holds only this rank's shard; "
            "pyquant.save writes one unsharded checkpoint: save the model before "
            "tensor_parallel_, and let each rank read its slices with load_sharded")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save {path}: the folder {folder} does not exist")
    layers = {}
    # every name of a layer that two parents share: load swaps each of them
    for fqn, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, qnn.QUANT_LAYERS):
            layers[fqn] = {
                "config": m.config.to_dict(), "in_features": m.in_features,
                "out_features": m.out_features, "bias": m.bias is not None,
                "bias_dtype": None if m.bias is None else str(m.bias.dtype)[6:],
            }
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        if t.is_meta:
            raise ValueError(f"cannot save {path}: {key!r} is on the meta device (no data)")
        if t.dtype not in _CODES:
            raise ValueError(f"cannot save {path}: {key!r} has dtype {t.dtype}; supported: "
                             f"{', '.join(str(d) for d in _CODES)}")
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen.setdefault(ident, key)
        tensors[key] = t.detach()
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "pyquant_version": __version__,
            "layers": json.dumps(layers, sort_keys=True)}
    if aliases:
        meta["aliases"] = json.dumps(aliases, sort_keys=True)
    blob = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors does
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": never clobber; normal umask permissions, unlike mkstemp
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for k in order:  # one tensor at a time on the CPU: no second copy of the model
                t = tensors[k].to("cpu").contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    from .calibrate.report import write_beside

    write_beside(path, model, report)


def load(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load a ``save``d checkpoint into ``model``, a float skeleton (on any device, or built under
    ``torch.device("meta")``): the Linear layers the checkpoint names become quantized layers, then
    every tensor is loaded (``assign=True`` when the skeleton has meta tensors). Returns ``model``.

    ``strict`` as in ``load_state_dict`` for the float part; quantized layers always need all of
    their buffers. The model is changed only after the whole file has been validated. An accuracy
    report saved beside the checkpoint (``<path>.report.json``) becomes
    ``model.pyquant_accuracy`` again (an unreadable one only warns)."""
    _check_host()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    returned, model = model, _uncompiled(model)
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            entries, meta, data_start = _read_header(f, size, path)
            specs, aliases = _read_metadata(meta, entries, path)
            model_sd = model.state_dict(keep_vars=True)
            expected, quant_keys = _plan(model, model_sd, specs, entries, aliases, path, strict)
            keys = {aliases.get(k, k) for k in expected if aliases.get(k, k) in entries}
            tensors = _read_tensors(f, data_start, entries, keys, path)
            _check_values(tensors, aliases, quant_keys, path,
                          layer_k={fqn: spec[1] for fqn, spec in specs.items()})
        except (ValueError, MemoryError, OSError):
            raise
        except Exception as e:  # anything else a hostile header can provoke is still corruption
            raise _err(path, f"corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e

    assign = any(t.is_meta for t in model_sd.values())
    swapped: dict[int, nn.Module] = {}  # a Linear the skeleton shares stays one (new) layer
    for fqn, (config, k, n, bias, bias_dtype) in specs.items():
        old = model.get_submodule(fqn)
        new = swapped.get(id(old))
        if new is None:
            dev = next((t.device for t in old.state_dict().values() if not t.is_meta), "cpu")
            new = swapped[id(old)] = config.layer_cls.empty(k, n, bias, config,
                                                            bias_dtype=bias_dtype, device=dev)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    sd = {}
    for key in expected:
        src = aliases.get(key, key)
        if src in tensors:
            # Share an aliased tensor only where the skeleton ties the two too: with assign=True
            # sharing would otherwise tie tensors that the model keeps apart.
            tied = src == key or model_sd.get(key) is model_sd.get(src)
            sd[key] = tensors[src] if tied else tensors[src].clone()
    try:
        result = model.load_state_dict(sd, strict=strict, assign=assign)
    except RuntimeError as e:
        raise _err(path, f"could not load into the model: {e}") from e
    # the quantized layers' tensors, whatever strict says: a layer swapped in and left empty
    # would compute with zero codes and unit scales
    empty = [k for k in result.missing_keys if any(k.startswith(f + ".") for f in specs)]
    if empty:
        raise _err(path, f"the quantized layers' tensors {empty[:5]} were not loaded")
    from ._hugepages import place_module

    for layer in swapped.values():  # their weights as decode streams them fastest
        place_module(layer)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        warnings.warn(f"pyquant.load({path}): {len(left)} tensor(s) are still on the meta device "
                      f"(not in the checkpoint, e.g. non-persistent buffers): {left[:5]}; "
                      "initialize them before use", RuntimeWarning, stacklevel=2)
    from .calibrate.report import read_beside

    read_beside(path, model)
    return returned


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a torch.compile wrapper runs (its state_dict names carry "_orig_mod."), so
    that a compiled model saves and loads under the names of the plain one."""
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule" \
        else model


def _no_duplicates(pairs):  # json keeps the last of repeated keys silently; we refuse them
    d = dict(pairs)
    if len(d) != len(pairs):
        dups = sorted(k for k, c in Counter(k for k, _ in pairs).items() if c > 1)
        raise ValueError(f"duplicate key(s) {dups[:5]}")
    return d


def _read_header(f, size: int, path: str):
    """Parse and check the header: (entries {key: (dtype, shape, begin, end)}, metadata, start)."""
    if size < 8:
        raise _err(path, f"file is {size} bytes, too short for the 8-byte header length")
    first = f.read(8)
    if first[:4] == b"PK\x03\x04":
        raise _err(path, "not a safetensors file: it is a zip archive, as torch.save writes; "
                         "load it with torch.load, or write checkpoints with pyquant.save")
    n = int.from_bytes(first, "little")
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise _err(path, f"header length {n} is impossible for a file of {size} bytes (limit "
                         f"{MAX_HEADER_BYTES}): corrupt or truncated checkpoint")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys
        raise _err(path, f"header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _err(path, f"header must be a JSON object, found {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _err(path, "__metadata__ must map strings to strings")
    entries = {}
    for key, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise _err(path, f"tensor {key!r}: expected an object with dtype, shape and "
                             f"data_offsets, found {str(e)[:200]}")
        dtype = _DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise _err(path, f"tensor {key!r}: unknown dtype {e['dtype']!r}; known: "
                             f"{list(_DTYPES)}")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _err(path, f"tensor {key!r}: shape must be a list of non-negative ints, "
                             f"found {str(shape)[:200]}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_int, offs))
                and 0 <= offs[0] <= offs[1]):
            raise _err(path, f"tensor {key!r}: data_offsets must be [begin, end] with "
                             f"0 <= begin <= end, found {str(offs)[:200]}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offs[1] - offs[0] != nbytes:
            raise _err(path, f"tensor {key!r}: data_offsets {offs} span {offs[1] - offs[0]} "
                             f"bytes but {e['dtype']} {shape} needs {nbytes}")
        entries[key] = (dtype, tuple(shape), offs[0], offs[1])
    end, prev = 0, None
    for key, (_, _, b, e) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if b < end:
            raise _err(path, f"tensors {prev!r} and {key!r} overlap in the data section "
                             f"({key!r} begins at {b}, before {end})")
        end, prev = e, key
    data_len = size - 8 - n
    if end > data_len:
        raise _err(path, f"file is truncated: tensors need {end} bytes of data, found {data_len}")
    if end < data_len:
        raise _err(path, f"{data_len - end} unexpected bytes after the last tensor")
    return entries, meta, 8 + n


def _json_field(meta: dict, name: str, path: str) -> dict:
    try:
        value = json.loads(meta.get(name, "{}"), object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise _err(path, f"__metadata__[{name!r}] is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise _err(path, f"__metadata__[{name!r}] must be a JSON object")
    return value


def _read_metadata(meta: dict, entries: dict, path: str):
    """Check format keys; return ({fqn: (config, K, N, bias, bias_dtype)}, aliases)."""
    if meta.get("format") != FORMAT:
        raise _err(path, f"not a pyquant checkpoint: __metadata__ format is "
                         f"{meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _err(path, f"unsupported format_version {meta.get('format_version')!r}; this "
                         f"pyquant reads {FORMAT_VERSION!r}")
    aliases = _json_field(meta, "aliases", path)
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in entries or alias in entries:
            raise _err(path, f"alias {alias!r} -> {target!r}: the target must be a stored tensor "
                             "and the alias must not be one")
    specs = {}
    for fqn, s in _json_field(meta, "layers", path).items():
        need = ("config", "in_features", "out_features", "bias", "bias_dtype")
        if not fqn or not isinstance(s, dict) or not all(k in s for k in need):
            raise _err(path, f"layer {fqn!r}: expected a non-empty module name and an object "
                             f"with {', '.join(need)}, found {str(s)[:200]}")
        try:
            config = config_from_dict(s["config"])
        except (TypeError, ValueError) as e:
            raise _err(path, f"layer {fqn!r}: bad config {str(s['config'])[:200]}: {e}") from e
        k, n, bias, bdt = (s[x] for x in need[1:])
        if not (_is_int(k) and _is_int(n) and k > 0 and n > 0 and isinstance(bias, bool)):
            raise _err(path, f"layer {fqn!r}: in_features={k!r}, out_features={n!r} must be "
                             f"positive ints and bias={bias!r} a bool")
        if bias and bdt not in _BIAS_DTYPES:
            raise _err(path, f"layer {fqn!r}: bias_dtype {bdt!r} not in {list(_BIAS_DTYPES)}")
        specs[fqn] = (config, k, n, bias, _BIAS_DTYPES[bdt] if bias else None)
    return specs, aliases


def _plan(model, model_sd, specs, entries, aliases, path, strict):
    """Check the model against the file without changing either. Returns (expected
    {state_dict key: prototype tensor} of the model after the swap, {quantized key: fqn})."""
    expected, quant_keys = dict(model_sd), {}
    for fqn, (config, k, n, bias, bias_dtype) in specs.items():
        try:
            mod = model.get_submodule(fqn)
        except AttributeError:
            raise _err(path, f"layer {fqn!r} named in the checkpoint does not exist in the "
                             f"model ({type(model).__name__})") from None
        if is_conv1d(mod):  # quantize_ swapped the Conv1D for the Linear it computes
            features = (mod.nx, mod.nf)
        elif isinstance(mod, (nn.Linear, qnn.QUANT_LAYERS)):
            features = (mod.in_features, mod.out_features)
        else:
            raise _err(path, f"layer {fqn!r}: the model has a {type(mod).__name__} there, "
                             "expected an nn.Linear")
        if features != (k, n):
            raise _err(path, f"layer {fqn!r}: the model's Linear has in_features="
                             f"{features[0]}, out_features={features[1]}; the checkpoint "
                             f"has in_features={k}, out_features={n}")
        has_bias = getattr(mod, "bias", None) is not None
        if has_bias != bool(bias):  # another architecture: the layer would silently follow one
            raise _err(path, f"layer {fqn!r}: the model's Linear has "
                             f"{'a bias' if has_bias else 'no bias'}, the checkpoint's layer "
                             f"{'has one' if bias else 'has none'}; build the model as it was "
                             f"saved (bias={bool(bias)})")
        try:  # a meta-device prototype costs nothing and gives the exact buffer dtypes and shapes
            proto = config.layer_cls.empty(k, n, bias, config, bias_dtype=bias_dtype,
                                           device="meta")
        except (TypeError, ValueError) as e:
            raise _err(path, f"layer {fqn!r}: cannot build {config.layer_cls.__name__}: {e}")
        for key in [x for x in expected if x.startswith(fqn + ".")]:
            del expected[key]
        for name, t in proto.state_dict().items():
            expected[f"{fqn}.{name}"] = t
            quant_keys[f"{fqn}.{name}"] = fqn
    missing = []
    for key, want in expected.items():
        got = entries.get(aliases.get(key, key))
        if got is None:
            if key in quant_keys:
                raise _err(path, f"layer {quant_keys[key]!r}: buffer {key!r} is missing")
            missing.append(key)
            continue
        dtype, shape = got[:2]
        if key in quant_keys:
            if (dtype, shape) != (want.dtype, tuple(want.shape)):
                raise _err(path, f"layer {quant_keys[key]!r}: {key!r} is {dtype} {list(shape)}, "
                                 f"expected {want.dtype} {list(want.shape)}")
        elif shape != tuple(want.shape):
            raise _err(path, f"tensor {key!r} has shape {list(shape)}, the model expects "
                             f"{list(want.shape)}")
        elif dtype.is_floating_point != want.dtype.is_floating_point or (
                not dtype.is_floating_point and dtype != want.dtype):
            raise _err(path, f"tensor {key!r} is {dtype}, the model expects {want.dtype}")
    unexpected = [k for k in (*entries, *aliases) if k not in expected]
    if strict and (missing or unexpected):
        raise _err(path, f"checkpoint does not match the model: missing {len(missing)} key(s) "
                         f"{missing[:5]}, unexpected {len(unexpected)} key(s) {unexpected[:5]}; "
                         "pass strict=False to load only the matching keys")
    return expected, quant_keys


def _read_tensors(f, data_start: int, entries: dict, keys, path: str) -> dict:
    """Read each tensor straight into memory that torch owns (writable, no second copy)."""
    out = {}
    for key in sorted(keys, key=lambda k: entries[k][2]):  # in file order: sequential reads
        dtype, shape, b, e = entries[key]
        buf = torch.empty(e - b, dtype=torch.uint8)
        f.seek(data_start + b)
        if e > b and f.readinto(buf.numpy()) != e - b:
            raise _err(path, f"tensor {key!r}: the file ended early (truncated checkpoint)")
        if dtype == torch.bool and bool((buf > 1).any()):  # other bytes are undefined as bool
            raise _err(path, f"tensor {key!r}: BOOL data holds bytes other than 0 and 1")
        out[key] = buf.view(dtype).reshape(shape)  # bf16 too: no numpy dtype needed
    return out


def _read_tensor_parts(f, data_start: int, entries: dict, wants: dict, path: str) -> dict:
    """Like ``_read_tensors``, for ``wants`` {key: None (the whole tensor) or (axis, index,
    parts)}: only part ``index`` of ``parts`` equal parts along ``axis`` is read, one contiguous
    byte range per index of the axes before ``axis`` (a single range for axis 0). This is how
    each rank of pyquant.distributed.load_sharded reads only its own slice of a checkpoint."""
    out, whole = {}, {k for k, v in wants.items() if v is None}
    out.update(_read_tensors(f, data_start, entries, whole, path))
    for key in sorted(set(wants) - whole, key=lambda k: entries[k][2]):
        dtype, shape, b, _ = entries[key]
        axis, index, parts = wants[key]
        if not (0 <= axis < len(shape) and 0 <= index < parts and shape[axis] % parts == 0):
            raise _err(path, f"tensor {key!r} {list(shape)}: cannot take part {index} of {parts} "
                             f"along axis {axis}")
        step = shape[axis] // parts
        outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:]) * dtype.itemsize
        chunk, row = step * inner, shape[axis] * inner
        buf = torch.empty(outer * chunk, dtype=torch.uint8)
        view = buf.numpy()
        for o in range(outer if chunk else 0):
            f.seek(data_start + b + o * row + index * chunk)
            if f.readinto(view[o * chunk:(o + 1) * chunk]) != chunk:
                raise _err(path, f"tensor {key!r}: the file ended early (truncated checkpoint)")
        if dtype == torch.bool and bool((buf > 1).any()):
            raise _err(path, f"tensor {key!r}: BOOL data holds bytes other than 0 and 1")
        out[key] = buf.view(dtype).reshape(*shape[:axis], step, *shape[axis + 1:])
    return out


def _check_values(tensors: dict, aliases: dict, quant_keys: dict, path: str,
                  layer_k: dict | None = None) -> None:
    """The value ranges the kernels rely on, for every quantized layer's buffers. Sparse layers
    (index buffers: 2:4 positions, bitmask + row offsets) are checked by
    ``sparse_nn.check_loaded``; ``layer_k`` {fqn: in_features} makes its bitmask check exact."""
    from . import sparse_nn

    per_layer: dict = {}
    for key, fqn in quant_keys.items():
        per_layer.setdefault(fqn, {})[key[len(fqn) + 1:]] = tensors[aliases.get(key, key)]
    for fqn, bufs in per_layer.items():
        if "weight_meta" in bufs or "weight_bitmask" in bufs:
            why = sparse_nn.check_loaded(bufs, (layer_k or {}).get(fqn))
            if why:
                raise _err(path, f"layer {fqn!r}: {why}")
    for key, fqn in quant_keys.items():
        t, name = tensors[aliases.get(key, key)], key[len(fqn) + 1:]
        if name in ("weight_scale", "weight_scales", "input_scale"):
            nan, inf, neg = (int(m.sum()) for m in (t.isnan(), t.isinf(), (t <= 0) & t.isfinite()))
            bad = nan + inf + neg
            what = (f"{name} has {bad} bad value(s) ({nan} NaN, {inf} inf, {neg} finite <= 0); "
                    "scales must be finite and > 0")
        elif name == "weight" and t.dtype == torch.int8:
            bad = int((t == -128).sum())
            what = (f"int8 weight has {bad} value(s) of -128; expected [-127, 127] (the kernels "
                    "assume a symmetric range)")
        elif name == "weight_zeros":
            bad = int((t > 15).sum())
            what = f"weight_zeros has {bad} value(s) > 15; int4 zero points must be in [0, 15]"
        else:
            continue
        if bad:
            raise _err(path, f"layer {fqn!r}: {what}")
