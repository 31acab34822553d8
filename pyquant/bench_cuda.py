"""CUDA benchmark: pyquant's Triton kernels against cuBLAS and peers, on the linear layers of
real models, every number a ratio measured in the same run.

    pyquant bench --device cuda --out results/      (or python -m pyquant.bench_cuda)

Per shape [N, K] (out_features, in_features) and batch M (tokens):
    bf16 / fp16   F.linear (cuBLAS)                         the baselines; speedups are vs bf16
    int_mm        torch._int_mm int8 x int8 -> int32        cuBLASLt int8 (no quantization cost)
    pyquant.*     torch.ops.pyquant.<op>, triton backend forced, tuned before timing: what a
                  user gets, the dense path where DENSE_FALLBACK_MIN_M sends the call there
    kernel.*      the op's Triton kernel forced, at the M where pyquant.* runs the dense path
    dense         the triton backend's dense path (dequantize with pyquant_triton/kernels/dequant.py, then
                  cuBLAS) forced: from M = 128 (2:4 ops: every M); where it beats the kernel
                  at some M and every larger one on every shape, the run suggests that M for
                  DENSE_FALLBACK_MIN_M in pyquant/_triton.py
    torchao.*     / bnb.*  where installed (their own formats: a peer, not the same numerics)
    torch.sparse24  PyTorch's own 2:4 (to_sparse_semi_structured: cuSPARSELt or CUTLASS) on
                  the same 2:4-pruned bf16 weight as pyquant.sparse24_mm, the peer of the
                  2:4 rows (pyquant.sparse24_mm / sparse24_int8_mm, Triton); their speedup
                  column is against the dense bf16 F.linear of the unpruned weight

Timing: every implementation runs over R copies of the weights (R chosen so that the smallest
format's copies hold 4x the L2), back to back in one CUDA graph that is replayed between CUDA
events; a call's time is the median replay over R. Each call finds its weights in HBM, as a
served model's consecutive layers do, and no flush kernel or graph launch of ours sits between
the events and the kernels. (A first version flushed the L2 before each call by *writing* 256
MB: the timed kernel then also paid for writing the flush's dirty lines back. The run prints
bf16 at M = 1 timed that way, with a read flush, and rotated: 18.5, 15.5 and 13.2 us on an
H200.) These are device times: what a server that replays CUDA graphs
(torch.compile mode="reduce-overhead", vLLM, SGLang) pays. The ``eager_us`` column of the CSV
times plain eager calls of pyquant's ops (L2 flushed by a read before each), host launch path
included, for callers without graphs.

Reported beside each time: weight + activation bytes per second and their share of the copy
bandwidth measured in this run (decode, memory bound), and TFLOP/s (TOPS for int8) with the
share of the GPU's dense tensor peak where known (prefill, compute bound).
Writes bench_cuda.csv, bench_cuda.json and a suggested DENSE_FALLBACK_MIN_M to --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

DEVICE = "cuda"  # a module constant so that a CPU smoke test can point it elsewhere
SHAPES = {
    # name: (N, K)
    "llama2-7b.attn(qkvo)": (4096, 4096),
    "llama2-7b.mlp.up/gate": (11008, 4096),
    "llama2-7b.mlp.down": (4096, 11008),
    "llama2-70b-tp8.attn": (1024, 8192),
    "llama2-70b-tp8.mlp.up/gate": (3584, 8192),
    "llama2-70b-tp8.mlp.down": (8192, 3584),
    "8192x8192": (8192, 8192),
}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 2048, 4096)
DENSE_OPS = ("int8_weight_only_mm", "int8_dynamic_mm", "int4_weight_only_mm")
SPARSE_OPS = ("sparse24_mm", "sparse24_int8_mm")
OPS = DENSE_OPS + SPARSE_OPS
GROUP = 128
ROTATE_MAX = 64  # copies of a shape's weights at most (the smallest shapes' int4 need ~60)
# Dense tensor-core peaks (no sparsity), TFLOP/s bf16 and TOPS int8, by device-name substring.
PEAKS = {"H200": (989.4, 1978.9), "H100 SXM": (989.4, 1978.9), "H100 NVL": (835.0, 1670.0),
         "H100 PCIe": (756.0, 1513.0), "H100": (989.4, 1978.9), "A100": (312.0, 624.0),
         "L40S": (362.0, 733.0), "L4": (121.0, 242.5), "A10": (125.0, 250.0)}


def _peaks(name: str):
    for key, v in PEAKS.items():
        if key in name:
            return v
    return None


class Timer:
    """Device time of one call. ``rotated``: the call over every copy of the weights, back to
    back in one CUDA graph (pyquant_triton/kernels/_autotune.rotated_time_us), for every implementation
    alike, so the numbers compare kernels, not Python launch paths or a flush. ``eager`` times
    plain calls of the first copy instead, L2 flushed before each: what a caller without CUDA
    graphs sees, host overhead included."""

    def __init__(self):
        from pyquant import _triton

        self.at = _triton.kernels()._autotune

    def rotated(self, fns: list, iters: int) -> float:
        return self.at.rotated_time_us(fns, reps=iters)

    def eager(self, fn: Callable[[], object], iters: int) -> float:
        return self.at.device_time_us(fn, budget_ms=1e9, max_reps=iters, graph=False)


def rotation_count(weight_bytes: int) -> int:
    """Copies of the weights so that the smallest format's copies together hold 4x the L2:
    each call then finds its weights in HBM, as a served model's layers do."""
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 0) or (60 << 20)
    return int(min(ROTATE_MAX, max(2, -(-4 * l2 // max(1, weight_bytes)))))


def timing_check(timer: "Timer", w_copies: list, k: int) -> dict:
    """bf16 F.linear at M = 1 on the first shape, timed three ways: after a flush that *writes*
    256 MB (what this benchmark did first, and what many do), after one that reads it, and
    rotated. The first times the write-back of the flush's dirty lines too."""
    at = timer.at
    x = torch.randn(1, k, device=DEVICE).to(torch.bfloat16)
    w0 = w_copies[0]["bf16"]
    buf = at._flush_buffer(torch.device(DEVICE, torch.cuda.current_device()))

    def single(flush):
        g = torch.cuda.CUDAGraph()
        F.linear(x, w0)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            F.linear(x, w0)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(30)]
        for a, b in ev:
            flush()
            a.record()
            g.replay()
            b.record()
        torch.cuda.synchronize()
        return sorted(1e3 * a.elapsed_time(b) for a, b in ev)[len(ev) // 2]

    out = dict(write_flush_us=single(buf.zero_), read_flush_us=single(lambda: at.flush_l2(buf)),
               rotated_us=timer.rotated([lambda w=w["bf16"]: F.linear(x, w) for w in w_copies],
                                        30))
    print("# timing check, bf16 F.linear M=1 on the first shape: "
          + ", ".join(f"{key} {v:.1f}" for key, v in out.items()))
    return {key: round(v, 2) for key, v in out.items()}


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device read+write bandwidth in GB/s (copy of a buffer much larger than L2)."""
    n = int(gib * (1 << 30))
    a = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    del a, b
    return 2 * n / dt / 1e9


def _weights(n: int, k: int, seed: int = 0):
    from pyquant import formats
    from pyquant import sparse_formats as sf

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
    q8, s8 = formats.quantize_int8_per_channel(w)
    codes, s4, z4 = formats.quantize_int4_groupwise(w, GROUP)
    v24, meta = sf.compress_24(w)  # magnitude 2:4: the two largest |w| of each 4
    w24 = sf.decompress_24(v24, meta)
    v24q, v24s = sf.quantize_24_int8(v24)
    return dict(
        bf16=w.to(torch.bfloat16), fp16=w.to(torch.float16), bf16_24=w24.to(torch.bfloat16),
        int8_weight_only_mm=(q8, s8), int8_dynamic_mm=(q8, s8),
        int4_weight_only_mm=(formats.pack_int4(codes), s4, z4, GROUP),
        sparse24_mm=(v24.to(torch.bfloat16), meta), sparse24_int8_mm=(v24q, meta, v24s),
    )


def _weight_bytes(impl: str, n: int, k: int) -> int:
    if impl in ("bf16", "fp16") or impl.startswith("dense"):
        return 2 * n * k
    if impl in ("pyquant.sparse24_mm", "torch.sparse24"):
        return n * k + n * k // 8  # bf16 kept half + 2-bit positions
    if impl == "pyquant.sparse24_int8_mm":
        return n * k // 2 + n * k // 8 + 4 * n
    if "int4" in impl or "nf4" in impl:
        return n * k // 2 + (n * k // GROUP) * 5
    return n * k + 4 * n


def _torch_sparse24(w24_bf16: torch.Tensor):
    """PyTorch's semi-structured 2:4 weight (cuSPARSELt where built in, else CUTLASS), or the
    reason it is unavailable."""
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(w24_bf16)
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:160]


def _peer_impls(n: int, k: int, w_bf16: torch.Tensor) -> dict:
    """torchao / bitsandbytes linears where installed: {name: callable(x) or reason str}."""
    out: dict = {}
    try:
        from torchao.quantization import quantize_ as ao_quantize

        def ao(make):
            lin = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
            lin.weight.data.copy_(w_bf16)
            ao_quantize(lin, make())
            return lin

        import torchao.quantization as aoq

        makers = {
            "torchao.int4wo": lambda: (aoq.Int4WeightOnlyConfig(group_size=GROUP)
                                       if hasattr(aoq, "Int4WeightOnlyConfig")
                                       else aoq.int4_weight_only(group_size=GROUP)),
            "torchao.int8wo": lambda: (aoq.Int8WeightOnlyConfig()
                                       if hasattr(aoq, "Int8WeightOnlyConfig")
                                       else aoq.int8_weight_only()),
            "torchao.int8dyn": lambda: (aoq.Int8DynamicActivationInt8WeightConfig()
                                        if hasattr(aoq, "Int8DynamicActivationInt8WeightConfig")
                                        else aoq.int8_dynamic_activation_int8_weight()),
        }
        for name, make in makers.items():
            try:
                out[name] = ao(make)
            except Exception as e:
                out[name] = f"{type(e).__name__}: {e}"[:160]
    except Exception as e:
        out["torchao"] = f"not available ({type(e).__name__})"
    try:
        import bitsandbytes as bnb

        try:
            lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                                    quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w_bf16.cpu(), requires_grad=False, quant_type="nf4")
            out["bnb.nf4"] = lin.cuda()
        except Exception as e:
            out["bnb.nf4"] = f"{type(e).__name__}: {e}"[:160]
        try:
            lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
            lin.weight = bnb.nn.Int8Params(w_bf16.cpu().half(), requires_grad=False,
                                           has_fp16_weights=False)
            out["bnb.int8"] = lin.cuda()
        except Exception as e:
            out["bnb.int8"] = f"{type(e).__name__}: {e}"[:160]
    except Exception as e:
        out["bitsandbytes"] = f"not available ({type(e).__name__})"
    return out


def run(args) -> list:
    import pyquant
    from pyquant import _triton

    why = _triton.why_unavailable()
    if why:
        raise SystemExit(f"bench_cuda: the Triton backend is unavailable: {why}")
    dev = torch.cuda.get_device_name()
    peaks = _peaks(dev)
    bw = copy_bandwidth()
    print(f"# {dev}, torch {torch.__version__}, triton {_triton._triton_version()}, "
          f"copy bandwidth {bw:.0f} GB/s, peaks (bf16 TFLOP/s, int8 TOPS) {peaks}")
    timer = Timer()
    rows: list = []
    t_start = time.perf_counter()
    shapes = {name: nk for name, nk in SHAPES.items()
              if not args.shapes or any(s in name for s in args.shapes)}
    check = None
    for sname, (n, k) in shapes.items():
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"# time budget of {args.time_budget} s spent: stopping before {sname}")
            break
        smallest = min(_weight_bytes(f"pyquant.{op}", n, k) for op in args.ops) \
            if args.ops else 2 * n * k
        copies = [_weights(n, k, seed=i) for i in range(rotation_count(smallest))]
        print(f"# {sname}: {len(copies)} copies of the weights rotate")
        if check is None:
            check = timing_check(timer, copies, k)
            _write.meta_extra["timing_check_bf16_m1"] = dict(shape=sname, **check)
        # each copy also holds its peers' modules and torch's 2:4 weight, built from its weights
        want24 = any(o in SPARSE_OPS for o in args.ops)
        for W in copies:
            W["peers"] = _peer_impls(n, k, W["bf16"]) if args.peers else {}
            W["ts24"] = _torch_sparse24(W["bf16_24"]) if want24 else None
        peers, ts24 = copies[0]["peers"], copies[0]["ts24"]
        if isinstance(ts24, str):
            print(f"# {sname}: torch.sparse24 skipped: {ts24}")
        for name, p in peers.items():
            if isinstance(p, str):
                print(f"# {sname}: {name} skipped: {p}")
        for m in args.ms:
            xb = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
            xh = xb.to(torch.float16)
            iters = args.iters if m <= 256 else max(5, args.iters // 2)
            # impl name -> factory: weights of one copy -> a call over them
            makers: dict = {
                "bf16": lambda W: (lambda: F.linear(xb, W["bf16"])),
                "fp16": lambda W: (lambda: F.linear(xh, W["fp16"])),
            }
            xq = torch.randint(-127, 128, (m, k), device=DEVICE, dtype=torch.int8)
            try:
                torch._int_mm(xq, copies[0]["int8_dynamic_mm"][0].t())
                makers["int_mm"] = lambda W: (lambda wt=W["int8_dynamic_mm"][0].t():
                                              torch._int_mm(xq, wt))
            except Exception as e:
                rows.append(dict(shape=sname, n=n, k=k, m=m, impl="int_mm", us=None,
                                 note=f"{type(e).__name__}: {str(e)[:80]}"))
            for op in args.ops:
                fn = getattr(torch.ops.pyquant, op)

                def make(W, fn=fn, op=op):
                    def call(wargs=W[op]):
                        with pyquant.use_backend("triton"):
                            return fn(xb, *wargs, None)
                    return call

                t0 = time.perf_counter()
                make(copies[0])()  # tunes (or reads the cache) outside the timing
                torch.cuda.synchronize()
                tune_s = time.perf_counter() - t0
                if tune_s > 1:
                    print(f"#   tuned {op} N={n} K={k} M={m} in {tune_s:.1f} s")
                makers[f"pyquant.{op}"] = make
                if args.dense and (m >= 128 or op in SPARSE_OPS):
                    impl_fn = getattr(_triton, op)

                    def dense_maker(W, impl_fn=impl_fn, op=op):
                        def dense(wargs=W[op]):
                            old = _triton.DENSE_FALLBACK_MIN_M.get(op)
                            _triton.DENSE_FALLBACK_MIN_M[op] = 1
                            try:
                                return impl_fn(xb, *wargs, None)
                            finally:
                                if old is None:
                                    _triton.DENSE_FALLBACK_MIN_M.pop(op)
                                else:
                                    _triton.DENSE_FALLBACK_MIN_M[op] = old
                        return dense

                    makers[f"dense.{op}"] = dense_maker
                if _triton.dense_fallback_reason(op, m):  # pyquant.<op> runs dense here
                    impl_fn = getattr(_triton, op)

                    def kernel_maker(W, impl_fn=impl_fn, op=op):
                        def kernel(wargs=W[op]):
                            old = _triton.DENSE_FALLBACK_MIN_M.pop(op)
                            try:
                                return impl_fn(xb, *wargs, None)
                            finally:
                                _triton.DENSE_FALLBACK_MIN_M[op] = old
                        return kernel

                    makers[f"kernel.{op}"] = kernel_maker
            for name, p in peers.items():
                if not isinstance(p, str):
                    makers[name] = lambda W, name=name: (lambda p=W["peers"][name]: p(xb))
            if ts24 is not None and not isinstance(ts24, str):
                makers["torch.sparse24"] = lambda W: (lambda t=W["ts24"]: F.linear(xb, t))
            base = None
            for impl, maker in makers.items():
                try:
                    us = timer.rotated([maker(W) for W in copies], iters)
                    eager_us = timer.eager(maker(copies[0]), iters) \
                        if impl.startswith("pyquant.") else None
                except Exception as e:
                    rows.append(dict(shape=sname, n=n, k=k, m=m, impl=impl, us=None,
                                     note=f"{type(e).__name__}: {str(e)[:80]}"))
                    continue
                if impl == "bf16":
                    base = us
                nbytes = _weight_bytes(impl, n, k) + 2 * m * k + 2 * m * n
                gbs = nbytes / us / 1e3
                tflops = 2 * m * n * k / us / 1e6
                int8_core = impl in ("int_mm", "pyquant.int8_dynamic_mm") or "int8dyn" in impl
                peak = None if peaks is None else peaks[1 if int8_core else 0]
                rows.append(dict(
                    shape=sname, n=n, k=k, m=m, impl=impl, us=round(us, 2),
                    eager_us=None if eager_us is None else round(eager_us, 2),
                    speedup_vs_bf16=None if base is None else round(base / us, 3),
                    gb_s=round(gbs, 1), pct_copy_bw=round(100 * gbs / bw, 1),
                    tflops=round(tflops, 1),
                    pct_peak=None if peak is None else round(100 * tflops / peak, 1),
                ))
        _write(args.out, rows, dev, bw, peaks)
        _print_table([r for r in rows if r["shape"] == sname], sname, n, k)
    return rows


SHORT = {"int8_weight_only_mm": "i8wo", "int8_dynamic_mm": "i8dyn",
         "int4_weight_only_mm": f"i4wo-g{GROUP}", "sparse24_int8_mm": "s24-i8",
         "sparse24_mm": "s24-bf16"}


def _short(impl: str) -> str:
    for op, short in SHORT.items():
        impl = impl.replace(op, short)
    return impl.replace("pyquant.", "pq.")[-24:]


def _print_table(rows: list, sname: str, n: int, k: int) -> None:
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    print(f"\n## {sname}  N={n} K={k}   (us  xspeedup-over-bf16  %copy-bandwidth)")
    print(f"{'M':>6} " + " ".join(f"{_short(i):>24}" for i in impls))
    for m in sorted({r["m"] for r in rows}):
        cells = []
        for i in impls:
            r = next((r for r in rows if r["m"] == m and r["impl"] == i), None)
            if r is None or r.get("us") is None:
                cells.append(f"{'-':>24}")
            else:
                sp = r.get("speedup_vs_bf16")
                cells.append(f"{r['us']:>12.1f} {('x%.2f' % sp) if sp else '':>7} "
                             f"{r['pct_copy_bw']:>3.0f}%")
        print(f"{m:>6} " + " ".join(cells))


def suggest_dense_fallback(rows: list) -> dict:
    """{op: M_min} where the dense path beats the kernel at M_min and every larger measured M
    on every shape (the conservative reading), else nothing for that op."""
    out = {}
    for op in OPS:
        ms = sorted({r["m"] for r in rows if r["impl"] == f"dense.{op}" and r.get("us")})
        wins = []
        for m in ms:
            ok = True
            for r in rows:
                if r["impl"] == f"dense.{op}" and r["m"] == m and r.get("us"):
                    same = [q for q in rows if q["m"] == m and q["shape"] == r["shape"]
                            and q.get("us")]
                    # the kernel: forced where the dispatch already runs the dense path
                    kern = next((q for q in same if q["impl"] == f"kernel.{op}"),
                                next((q for q in same if q["impl"] == f"pyquant.{op}"), None))
                    if kern is None or r["us"] >= kern["us"]:
                        ok = False
            wins.append(ok)
        for i, m in enumerate(ms):
            if all(wins[i:]):
                out[op] = m
                break
    return out


def _write(out_dir: str, rows: list, dev: str, bw: float, peaks) -> None:
    os.makedirs(out_dir, exist_ok=True)
    keys = ["shape", "n", "k", "m", "impl", "us", "eager_us", "speedup_vs_bf16", "gb_s", "pct_copy_bw",
            "tflops", "pct_peak", "note"]
    with open(os.path.join(out_dir, "bench_cuda.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    meta = dict(device=dev, torch=torch.__version__, python=platform.python_version(),
                copy_bandwidth_gb_s=round(bw, 1), peaks_bf16_tflops_int8_tops=peaks,
                suggested_DENSE_FALLBACK_MIN_M=suggest_dense_fallback(rows),
                timing="rotated weights, CUDA-graph replay (see Timer)", **_write.meta_extra)
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        pass
    with open(os.path.join(out_dir, "bench_cuda.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


_write.meta_extra = {}


def _candidate_calls(op: str, W: dict, x: torch.Tensor, n: int, k: int, sms: int):
    """(config, call) for every autotuning candidate (and the heuristic default) of ``op`` at
    this shape and x's batch: the kernels the tuner will compile."""
    from pyquant import _triton

    mod = getattr(_triton.kernels(), _triton.MODULES[op])
    launcher = getattr(mod, op)
    m, dt = x.shape[0], x.dtype
    wargs = W[op]
    if op == "int4_weight_only_mm":
        g = wargs[3]
        cands = [mod.default_config(m, n, k, g, dt, sms)] + mod.candidates(m, n, k, g, dt, sms)
    elif op == "int8_dynamic_mm":
        cands = [mod.default_config(m, n, k, sms)] + mod.candidates(m, n, k, sms)
    else:
        cands = [mod.default_config(m, n, k, dt, sms)] + mod.candidates(m, n, k, dt, sms)
    for c in cands:
        yield c, (lambda c=c: launcher(x, *wargs, None, config=c))


def precompile(args, part: int, parts: int) -> int:
    """Compile (launch once, untimed) every candidate of every (shape, M, op) in job slice
    ``part`` of ``parts``: run as parallel processes before the timed run, they fill Triton's
    on-disk cache, so the tuner then spends its time timing, not compiling."""
    from pyquant import _triton

    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    jobs = [(sname, nk, m) for sname, nk in SHAPES.items()
            if not args.shapes or any(s in sname for s in args.shapes) for m in args.ms]
    done = failed = 0
    for sname, (n, k), m in jobs[part::parts]:
        W = _weights(n, k)
        x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
        for op in args.ops:
            for _c, call in _candidate_calls(op, W, x, n, k, sms):
                try:
                    call()
                    done += 1
                except Exception:
                    failed += 1
            dq, w = _triton.kernels().dequant, W[op]
            if op == "int8_weight_only_mm":
                dq.dequantize_int8(*w, x.dtype)
            elif op == "int4_weight_only_mm":
                dq.dequantize_int4(*w, x.dtype)
            elif op in SPARSE_OPS:
                dq.densify_24(w[0], w[1], w[2] if len(w) == 3 else None, x.dtype)
        torch.cuda.synchronize()
    print(f"# precompile part {part}/{parts}: {done} launches, {failed} failed")
    return 0


def precompile_parallel(args, workers: int) -> None:
    import subprocess

    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "pyquant.bench_cuda", "--ms", ",".join(map(str, args.ms)),
            "--ops", *args.ops] + (["--shapes", *args.shapes] if args.shapes else [])
    env = dict(os.environ, PYQUANT_TRITON_AUTOTUNE="0")
    procs = [subprocess.Popen(argv + ["--precompile-part", f"{i}/{workers}"], env=env)
             for i in range(workers)]
    rcs = [p.wait() for p in procs]
    print(f"# precompiled in {workers} processes in {time.perf_counter() - t0:.0f} s "
          f"(exit codes {sorted(set(rcs))})")


def parse_args(argv: Optional[list] = None):
    p = argparse.ArgumentParser(prog="bench_cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_results",
                   help="output directory (default: $OUT or ./bench_results)")
    p.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=list(MS),
                   help="comma-separated batch sizes M")
    p.add_argument("--shapes", nargs="*", default=None,
                   help="substrings of shape names to run (default: all)")
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    p.add_argument("--iters", type=int, default=25, help="timed calls per measurement")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="skip torchao / bitsandbytes")
    p.add_argument("--no-dense", dest="dense", action="store_false",
                   help="skip timing the dense fallback path at M >= 256")
    p.add_argument("--quick", action="store_true",
                   help="M in 1,16,128,2048 on the Llama-2-7B shapes only")
    p.add_argument("--precompile", type=int, default=0, metavar="P",
                   help="first compile every candidate kernel in P parallel processes")
    p.add_argument("--precompile-part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--time-budget", type=float, default=0,
                   help="stop starting new shapes after this many seconds (0: no limit)")
    a = p.parse_args(argv)
    if a.quick:
        a.ms = [1, 16, 128, 2048]
        a.shapes = a.shapes or ["llama2-7b"]
    return a


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)  # first, so that --help works on a machine without a GPU
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    if args.precompile_part:
        part, parts = (int(v) for v in args.precompile_part.split("/"))
        return precompile(args, part, parts)
    t0 = time.perf_counter()
    if args.precompile:
        precompile_parallel(args, args.precompile)
    rows = run(args)
    sug = suggest_dense_fallback(rows)
    print(f"\n# suggested pyquant/_triton.py DENSE_FALLBACK_MIN_M = {sug}  "
          f"(dense path faster at that M and above on every shape measured)")
    print(f"# wrote {args.out}/bench_cuda.csv and .json in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
