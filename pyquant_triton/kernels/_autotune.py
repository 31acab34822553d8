"""A small autotuner with an on-disk cache, shared by the Triton kernels of pyquant.

Why not ``triton.autotune``: its on-disk result cache is not available in every Triton 3.x,
its key is the exact argument values (every new M would re-tune), and it cannot be asked to
tune ahead of serving. Here:

* a key is (op, activation dtype, M bucket, N, K, op-specific extras such as the group size);
  M is bucketed to the next power of two (capped at 4096), so a server sees at most ~13
  tunings per layer shape, and ``pyquant.warmup`` can do them all before the first request;
* results live in one JSON file per machine, ``$PYQUANT_CACHE_DIR/triton_autotune.json`` or
  ``~/.cache/pyquant/triton_autotune.json``, under a section named by the GPU, its compute
  capability and the Triton version (a config tuned on an H100 or with another Triton is not
  trusted on an H200);
* ``PYQUANT_TRITON_AUTOTUNE=0`` turns tuning off (the per-op heuristic config runs), and
  nothing is tuned while a CUDA graph is being captured (benchmarking synchronizes).

A config is a plain dict: ``path`` ("gemv", "gemv32" or "tiled"), block sizes, ``num_warps``,
``num_stages``. Every config of an op is valid for every M, N, K it is offered for (the kernels
mask their edges), so a config tuned at one M serves its whole bucket.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from typing import Callable, Optional

import torch

_LOCK = threading.Lock()
_MEM: dict = {}  # section -> {key: entry}
_LOADED: set = set()  # sections read from disk already
M_BUCKET_MAX = 4096


def m_bucket(m: int) -> int:
    b = 1
    while b < m and b < M_BUCKET_MAX:
        b *= 2
    return b


# Swapped-operand MMA tiles (BLOCK_N, BLOCK_K, num_warps, num_stages) of the int8 ops at every
# M up to 64, and the extra ones tried at decode (M <= 16): narrower and deeper, so that more
# programs, each with more loads in flight, share the few output rows.
SWAP_TILES = ((64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3))
DECODE_SWAP_TILES = ((32, 256, 4, 4), (64, 256, 4, 5), (128, 256, 8, 4))


def split_k(tiles: int, k_tiles: int, sms: int, per_sm: int = 2) -> int:
    """Split K (powers of two, <= 16) until the grid has ``per_sm`` programs per SM, keeping
    >= 4 K tiles per split. Decode shapes have few output tiles (N / BLOCK_N); without a split,
    too few bytes are in flight per SM to approach HBM bandwidth."""
    s = 1
    while tiles * s < per_sm * sms and s < 16 and k_tiles // (2 * s) >= 4:
        s *= 2
    return s


def split_choices(tiles: int, k_tiles: int, sms: int) -> list:
    """The split-K values worth tuning: none, ~2 and ~8 programs per SM, and "one shot" (every
    program loads one K tile and ends: nothing waits on a loop-carried load, so all of the
    weight's loads are in flight at once, which is what a memory-bound decode kernel wants)."""
    out = {1, split_k(tiles, k_tiles, sms, 2), split_k(tiles, k_tiles, sms, 8)}
    if 2 <= k_tiles <= 32 and tiles * k_tiles <= 64 * sms:
        out.add(k_tiles)
    return sorted(out)


def tiled_config(m: int, n: int, k: int, bm: int, bn: int, bk: int, warps: int, stages: int,
                 swap: bool, sms: int, split: bool = True) -> dict:
    """A "tiled" (MMA) path config; split-K chosen by ``split_k`` over K / BLOCK_K tiles when
    ``split``."""
    import triton

    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    s = split_k(tiles, triton.cdiv(k, bk), sms) if split else 1
    return dict(path="tiled", SWAP_AB=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                SPLIT_K=s, num_warps=warps, num_stages=stages)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number


def cache_path() -> str:
    d = os.environ.get("PYQUANT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pyquant")
    return os.path.join(d, "triton_autotune.json")


def enabled() -> bool:
    return os.environ.get("PYQUANT_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false",
                                                                                   "no", "off")


_SECTIONS: dict = {}


def section(device: torch.device) -> str:
    """The cache section of a GPU: its name, compute capability and the Triton version."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    sec = _SECTIONS.get(idx)
    if sec is None:
        import triton

        p = torch.cuda.get_device_properties(idx)
        sec = _SECTIONS[idx] = f"{p.name} sm{p.major}{p.minor} triton-{triton.__version__}"
    return sec


def make_key(op: str, dtype: torch.dtype, m: int, n: int, k: int, **extra) -> str:
    dt = str(dtype).replace("torch.", "")
    tail = "".join(f"|{k_}={v}" for k_, v in sorted(extra.items()))
    return f"{op}|{dt}|M{m_bucket(m)}|N{n}|K{k}{tail}"


def _read_file() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) and data.get("version") == 1 else {"version": 1}
    except (OSError, ValueError):
        return {"version": 1}


def _load_section(sec: str) -> dict:
    if sec not in _LOADED:
        _LOADED.add(sec)
        on_disk = _read_file().get("sections", {}).get(sec, {})
        _MEM.setdefault(sec, {}).update({k: v for k, v in on_disk.items() if isinstance(v, dict)})
    return _MEM.setdefault(sec, {})


def _write(sec: str, key: str, entry: dict) -> None:
    """Merge one entry into the file (read-modify-write, atomic rename): processes that tune
    concurrently lose no entries except when racing on the very same write."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_file()
        data.setdefault("sections", {}).setdefault(sec, {})[key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".triton_autotune.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is not an error: the in-memory cache still holds the result


def lookup(device: torch.device, key: str) -> Optional[dict]:
    with _LOCK:
        e = _load_section(section(device)).get(key)
    return None if e is None else e.get("config")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_FLUSH: dict = {}


def _flush_buffer(device) -> torch.Tensor:
    """256 MB, read before every timed call: evicts the L2 (50-60 MB on H100/H200), so the
    weights come from HBM as they do in serving."""
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.zeros(256 << 18, dtype=torch.int32, device=device)
    return _FLUSH[key]


def flush_l2(buf: torch.Tensor) -> None:
    """Evict the L2 by *reading* ``buf``. Writing it (``zero_()``, what many benchmarks do)
    leaves the L2 full of dirty lines, and the timed kernel then pays for writing them back
    to HBM while it streams its own weights in, which inflates every memory-bound time, the
    bf16 baseline's included (``python -m pyquant.bench_cuda`` prints both on its first
    shape)."""
    torch.amax(buf)


def device_time_us(fn: Callable[[], object], budget_ms: float = 10.0, max_reps: int = 100,
                   graph: bool = True) -> float:
    """Median device time of ``fn()`` in microseconds, L2 flushed before each call.

    ``fn`` is captured once in a CUDA graph and the graph is replayed: a graph replay costs the
    host a few microseconds, far less than the flush before it takes the GPU, so the events
    bracket the kernels alone. Timing eager calls instead measures the host whenever the Python
    launch path is slower than the kernel -- the case for every decode kernel (seen on an H200:
    100-300 us of host time around 10-20 us kernels). Falls back to eager timing when ``fn``
    cannot be captured (``graph=False`` forces it)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    flush = _flush_buffer(dev)
    call = fn
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            call = g.replay
        except Exception:
            torch.cuda.synchronize()
            call = fn
    call()
    torch.cuda.synchronize()

    def timed(n: int) -> list:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
        for a, b in ev:
            flush_l2(flush)
            a.record()
            call()
            b.record()
        torch.cuda.synchronize()
        return [1e3 * a.elapsed_time(b) for a, b in ev]

    first = timed(3)
    est = sorted(first)[1]
    reps = int(max(5, min(max_reps, budget_ms * 1e3 / (est + 70.0))))  # ~70 us per flush
    return float(statistics.median(first + timed(reps)))


def rotated_time_us(fns: list, reps: int = 25) -> float:
    """Median device time of one call, in microseconds, when ``fns`` -- the same call over
    different copies of the weights, more bytes together than the L2 holds -- run back to back
    in one CUDA graph: what a served model's consecutive layers see. Each call finds its
    weights evicted by the others, no flush kernel runs between them (so no write-back or
    launch gap of ours is timed), and one graph launch is shared by ``len(fns)`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(max(3, reps))]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return float(statistics.median(1e3 * a.elapsed_time(b) for a, b in ev)) / len(fns)


def _bench(fn: Callable[[], object]) -> float:
    """Median device time in microseconds, for ranking configs: ~10 ms of repetitions."""
    return device_time_us(fn, budget_ms=10.0)


def _same(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """A candidate's output against the heuristic config's, on the caller's own data: the
    configs differ only in summation order, so anything beyond rounding is a miscompiled or
    broken config (seen once on an H200), which must never win the tuning."""
    y = y.float()
    ref = ref.float()
    if y.shape != ref.shape or not torch.isfinite(y).eq(torch.isfinite(ref)).all():
        return False
    fin = torch.isfinite(ref)
    scale = ref[fin].abs().max() if fin.any() else ref.new_tensor(0.0)
    err = (y[fin] - ref[fin]).abs().max() if fin.any() else ref.new_tensor(0.0)
    return bool(err <= 1e-2 * scale + 1e-6)


def _brief(c: dict) -> str:
    """A config in one short string, e.g. 'tiled swap 16x64x128 s4 w4 st3'."""
    if str(c.get("path")).startswith("gemv"):
        return f"{c['path']} n{c.get('BLOCK_N')} k{c.get('BLOCK_K')} s{c.get('SPLIT_K', 1)} " \
               f"w{c.get('num_warps')} st{c.get('num_stages')}"
    return (f"{c.get('path')}{' swap' if c.get('SWAP_AB') else ''} {c.get('BLOCK_M')}x"
            f"{c.get('BLOCK_N')}x{c.get('BLOCK_K')} s{c.get('SPLIT_K', 1)} w{c.get('num_warps')} "
            f"st{c.get('num_stages')}")


def tune(device: torch.device, key: str, candidates: list, run: Callable[[dict], None],
         default: dict) -> dict:
    """The cached config for ``key``, tuning over ``candidates`` first when there is none.

    ``run(config)`` launches the op with that config and returns its output (it must be
    idempotent: every kernel here only writes its output); a candidate whose output differs
    from ``default``'s is rejected. Without tuning (disabled, or a CUDA graph is being captured) the
    heuristic ``default`` runs and nothing is cached."""
    cfg = lookup(device, key)
    if cfg is not None:
        return cfg
    if not enabled() or _capturing():
        return default
    results = []
    t0 = time.perf_counter()
    ref = run(default).clone()
    for c in candidates:
        try:
            y = run(c)  # compile + first run outside the timing
            if not _same(y, ref):
                raise ArithmeticError("result differs from the heuristic config's")
            results.append((_bench(lambda c=c: run(c)), c))
        except Exception as e:  # e.g. out of shared memory on a smaller GPU: skip the config
            results.append((float("inf"), {**c, "error": f"{type(e).__name__}: {e}"[:200]}))
    ok = [r for r in results if r[0] != float("inf")]
    best_us, best = min(ok, key=lambda r: r[0]) if ok else (float("inf"), default)
    entry = {
        "config": best,
        "us": best_us,
        # every candidate's time, fastest first: what the next change of the config space
        # should be judged against
        "timings": [[round(us, 2), _brief(c)] for us, c in sorted(ok, key=lambda r: r[0])],
        "rejected": [r[1] for r in results if r[0] == float("inf")],
        "tuned_s": round(time.perf_counter() - t0, 3),
        "candidates": len(candidates),
    }
    sec = section(device)
    with _LOCK:
        _load_section(sec)[key] = entry
        _write(sec, key, entry)
    return best


def clear_memory_cache() -> None:
    """Forget what this process has read or tuned (the file stays); for tests."""
    with _LOCK:
        _MEM.clear()
        _LOADED.clear()
