"""A/B of two builds of the native library, call by call, for kernel experiments.

On a shared or virtual machine the same call moves by 30-50% between runs, more than most
kernel changes are worth. Timing build A, then build B, compares two moments of the machine.
This script keeps one worker process per build alive and alternates single calls between
them, so both builds see the same moments; it prints each build's fastest and first-quartile
call and their ratio. Run a build against itself first: that is the floor. On a 2-vCPU VM it
read 0.99-1.02 on most cases, 1.01-1.07 on the decode-size ones (one thread), but 0.82-0.89
on one (the second worker placed worse); differences under that floor mean nothing. The
decode-size cases take 40 weights in turn, so that they read them from memory, not from the
last-level cache.

    cp pyquant/_C*.so a.so     # build A; then change, rebuild, and
    cp pyquant/_C*.so b.so     # build B
    python benchmarks/ab_builds.py a.so b.so [--threads 1] [--reps 11] [--cases w4a8]

The cases call the C API directly (raw pointers, the caller's workspace), so the Python
wrappers' overhead is not in the numbers. One thread by default: the kernel's own speed,
without the second core's noise. With --threads 2 on a 2-core machine the two workers'
OpenMP teams share the cores: run it with OMP_WAIT_POLICY=PASSIVE (else the idle worker's
threads spin), and still read a build against itself first (it read 1.14-1.83 in a noisy
hour). benchmarks/ab_inprocess.py loads both builds into one process (each under a name of
its own) and times them through the ops the layers run: no worker placement between them.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time


def _cases(C, torch, formats, nt: int) -> dict:
    """name -> zero-argument call of build C (the inputs are the same in both workers)."""
    ptr = lambda t: t.data_ptr()

    def workspace(nb):
        work = torch.empty(nb + 64, dtype=torch.uint8)
        return work, (ptr(work) + 63) // 64 * 64

    def int4(n, k, g):
        gen = torch.Generator().manual_seed(n + k + g)
        c, s, z = formats.quantize_int4_groupwise(torch.randn(n, k, generator=gen), g,
                                                  symmetric=False)
        return formats.pack_int4(c), s, z

    def int4_weight_only(m, n, k, g, copies=1, x_fp32=False):
        """copies > 1: that many weights in turn, so that decode sizes read them from memory
        (copies * n * k / 2 bytes past the last-level cache)."""
        isa = C.best_isa()
        ws = [int4(n, k, g) for _ in range(copies)]
        x = torch.randn(m, k)
        if not x_fp32:
            x = x.bfloat16().float()  # bf16 values: the one-term AMX path
        out = torch.empty(m, n)
        nb = C.int4_weight_only_workspace_bytes(isa, m, k, n, g, nt)
        work, wa = workspace(nb)
        calls = [0]

        def run():
            calls[0] += 1
            p, s, z = ws[calls[0] % copies]
            return C.int4_weight_only_mm(isa, ptr(x), m, k, k, ptr(p), n, ptr(s), ptr(z), g, 0,
                                         ptr(out), nt, wa, nb)
        run.keep = work
        return run

    def int4_weight_only_panels(m, n, k, g, copies):
        """int4 weight-only on the 32-row panels the layers keep (pyquant/panels.py; builds
        that have them), fp32 x, `copies` weights in turn as int4_weight_only. The codes are
        packed by build C's own packer, the groups' scales and zeros by pyquant's."""
        from pyquant import panels

        isa = C.best_isa()
        ws = []
        for p, s, z in (int4(n, k, g) for _ in range(copies)):
            pc = torch.empty_like(p)
            if C.pack_panels(isa, 4, 0, ptr(p), n, k, ptr(pc), 1):
                raise SystemExit("this build has no panel packer for int4")
            ws.append((pc, panels._groups_to_panels(s), panels._groups_to_panels(z)))
        x = torch.randn(m, k)
        out = torch.empty(m, n)
        nb = C.int4_weight_only_panels_workspace_bytes(isa, m, k, g, nt)
        work, wa = workspace(nb)
        calls = [0]

        def run():
            calls[0] += 1
            p, s, z = ws[calls[0] % copies]
            return C.int4_weight_only_mm_panels(isa, ptr(x), m, k, k, ptr(p), n, ptr(s), ptr(z),
                                                g, 0, ptr(out), nt, wa, nb)
        run.keep = work
        return run

    def int8_weight_only(m, n, k):
        isa = C.best_isa()
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n) / 100
        x = torch.randn(m, k).bfloat16().float()  # bf16 values: the one-term AMX path
        out = torch.empty(m, n)
        nb = C.int8_weight_only_workspace_bytes(isa, m, k, n, nt)
        work, wa = workspace(nb)
        return lambda: (work, C.int8_weight_only_mm(isa, ptr(x), m, k, k, ptr(w), n, ptr(s), 0,
                                                    ptr(out), nt, wa, nb))[1]

    def int8_dynamic(m, n, k, x_fp32=False):
        """The quantization of x (fp32) and the W8A8 GEMM, as the layer runs them; x_fp32:
        int8 weight-only with fp32 activations instead (its fixed-point AMX path)."""
        isa = C.best_isa()
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n) / 100
        x = torch.randn(m, k)
        xq, xs = torch.empty(m, k, dtype=torch.int8), torch.empty(m)
        out = torch.empty(m, n)
        if x_fp32:
            nb = C.int8_weight_only_workspace_bytes(isa, m, k, n, nt)
            work, wa = workspace(nb)
            return lambda: (work, C.int8_weight_only_mm(isa, ptr(x), m, k, k, ptr(w), n, ptr(s),
                                                        0, ptr(out), nt, wa, nb))[1]
        try:
            nb = C.int8_workspace_bytes(isa, m, k, n, nt)
        except TypeError:  # a build from before the n_threads argument
            nb = C.int8_workspace_bytes(isa, m, k, n)
        work, wa = workspace(nb)

        def run():
            st = C.quantize_rows_int8_amax(isa, ptr(x), m, k, k, 0, ptr(xq), ptr(xs), nt)
            return st or C.int8_dynamic_mm(isa, ptr(xq), ptr(xs), m, k, ptr(w), n, ptr(s), 0,
                                           ptr(out), nt, wa, nb)
        run.keep = work
        return run

    def w4a8(m, n, k, g):
        isa, (p, s, z) = C.best_isa(), int4(n, k, g)
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        xs = torch.rand(m) / 100
        out = torch.empty(m, n)
        nb = C.int4_dynamic_workspace_bytes(isa, m, k, g, nt)
        work, wa = workspace(nb)
        return lambda: (work, C.int4_dynamic_mm(isa, ptr(xq), ptr(xs), m, k, ptr(p), n, ptr(s),
                                                ptr(z), g, 0, ptr(out), wa, nb, nt))[1]

    def sparse24_quant(n, k, bits, copies, g=128, m=1, panels=False):
        """2:4 + int8 (bits 8) or + int4 group g (bits 4) at batch m, fp32 x (the fixed-point
        decode path); `copies` weights in turn, as int4_weight_only. panels: values and meta
        in the 4-row panels the layers keep (pyquant/sparse_panels.py; builds that have them)."""
        from pyquant import sparse_formats
        isa = C.best_isa()
        x = torch.randn(m, k)
        out = torch.empty(m, n)
        nb = (C.sparse24_panels_workspace_bytes if panels else C.sparse24_workspace_bytes)(
            isa, m, k)
        work, wa = workspace(nb)
        ws = []
        for i in range(copies):
            gen = torch.Generator().manual_seed(n + k + i)
            vals, meta = sparse_formats.compress_24(torch.randn(n, k, generator=gen))
            v, *rest = (sparse_formats.quantize_24_int8(vals) if bits == 8 else
                        sparse_formats.quantize_24_int4(vals, g))
            if panels:
                pv, pm = torch.empty_like(v), torch.empty_like(meta)
                C.pack_sparse24_panels(isa, bits, 0, ptr(v), ptr(meta), n, k, ptr(pv), ptr(pm), 1)
                v, meta = pv, pm
            ws.append((v, *rest, meta))
        calls = [0]
        mm8 = C.sparse24_int8_panels_mm if panels else C.sparse24_int8_mm
        mm4 = C.sparse24_int4_panels_mm if panels else C.sparse24_int4_mm

        def run():
            calls[0] += 1
            w = ws[calls[0] % copies]
            if bits == 8:
                q, s, meta = w
                return mm8(isa, ptr(x), m, k, k, ptr(q), ptr(meta), n, ptr(s), 0, ptr(out), nt,
                           wa, nb)
            p, s, z, meta = w
            return mm4(isa, ptr(x), m, k, k, ptr(p), ptr(meta), n, ptr(s), ptr(z), g, 0,
                       ptr(out), nt, wa, nb)
        run.keep = work
        return run

    def unstructured(n, k, copies, sparsity=0.7, m=1, values=torch.bfloat16, x_bf16=True):
        """Unstructured values (bitmask, 30% kept) at batch m; bf16 values with x of bf16
        values take the vdpbf16ps path, anything else the float loop; `copies` weights in
        turn, as int4_weight_only."""
        from pyquant import sparse_formats

        isa = C.best_isa()
        x = torch.randn(m, k)
        if x_bf16:
            x = x.bfloat16().float()
        out = torch.empty(m, n)
        code = {torch.bfloat16: C.DTYPE_BF16, torch.float32: C.DTYPE_F32}[values]
        ws = []
        for i in range(copies):
            gen = torch.Generator().manual_seed(n + k + i)
            w = torch.randn(n, k, generator=gen)
            keep = w.abs() >= w.abs().quantile(sparsity, dim=1, keepdim=True)
            bm, vals, off = sparse_formats.compress_unstructured(w.to(values), keep)
            ws.append((bm, vals, off))
        calls = [0]

        def run():
            calls[0] += 1
            bm, v, off = ws[calls[0] % copies]
            return C.sparse_unstructured_mm(isa, ptr(x), m, k, k, ptr(bm), ptr(v), code,
                                            v.numel(), ptr(off), n, 0, ptr(out), nt)
        return run

    return {
        "int8dyn 2560x384x384": lambda: int8_dynamic(2560, 384, 384),
        "int8dyn 2560x1536x384": lambda: int8_dynamic(2560, 1536, 384),
        "int8dyn 2560x384x1536": lambda: int8_dynamic(2560, 384, 1536),
        # where the panel GEMMs of the non-AMX builds take over (kernels.h)
        "int8dyn 8x11008x4096": lambda: int8_dynamic(8, 11008, 4096),
        "int8dyn 16x11008x4096": lambda: int8_dynamic(16, 11008, 4096),
        "int8dyn 32x11008x4096": lambda: int8_dynamic(32, 11008, 4096),
        "int8dyn 64x11008x4096": lambda: int8_dynamic(64, 11008, 4096),
        "int8dyn 64x384x1536": lambda: int8_dynamic(64, 384, 1536),
        "int8dyn 128x4096x4096": lambda: int8_dynamic(128, 4096, 4096),
        "int8dyn 512x4096x11008": lambda: int8_dynamic(512, 4096, 11008),
        "int8wo fp32-x 2560x384x384": lambda: int8_dynamic(2560, 384, 384, x_fp32=True),
        "w4a8 g64 2560x384x384": lambda: w4a8(2560, 384, 384, 64),
        "w4a8 g64 2560x1536x384": lambda: w4a8(2560, 1536, 384, 64),
        "w4a8 g64 512x4096x4096": lambda: w4a8(512, 4096, 4096, 64),
        "w4a8 g128 1x4096x4096": lambda: w4a8(1, 4096, 4096, 128),
        "w4a8 g128 4x4096x4096": lambda: w4a8(4, 4096, 4096, 128),
        "w4a8 g128 64x4096x4096": lambda: w4a8(64, 4096, 4096, 128),
        # 40 weights of 8.4 MB in turn: past a 300 MB last-level cache
        "int4wo g128 bf16-x 1x4096x4096": lambda: int4_weight_only(1, 4096, 4096, 128, 40),
        "int4wo g128 bf16-x 4x4096x4096": lambda: int4_weight_only(4, 4096, 4096, 128, 40),
        "int4wo g128 fp32-x 1x4096x4096": lambda: int4_weight_only(1, 4096, 4096, 128, 40,
                                                                  x_fp32=True),
        "int4wo g128 fp32-x 4x4096x4096": lambda: int4_weight_only(4, 4096, 4096, 128, 40,
                                                                  x_fp32=True),
        "int4wo g64 fp32-x 1x11008x4096": lambda: int4_weight_only(1, 11008, 4096, 64, 20,
                                                                  x_fp32=True),
        "int4wo g128 bf16-x 128x4096x4096": lambda: int4_weight_only(128, 4096, 4096, 128),
        "int4wo g128 bf16-x 512x4096x4096": lambda: int4_weight_only(512, 4096, 4096, 128),
        # MiniLM's layers at a batch of 64 sentences of 20 tokens
        "int4wo g64 fp32-x 1280x384x384": lambda: int4_weight_only(1280, 384, 384, 64, x_fp32=True),
        "int4wo g64 fp32-x 1280x1536x384": lambda: int4_weight_only(1280, 1536, 384, 64,
                                                                   x_fp32=True),
        "int4wo g64 fp32-x 1280x384x1536": lambda: int4_weight_only(1280, 384, 1536, 64,
                                                                   x_fp32=True),
        "int4wo g128 fp32-x 128x11008x4096": lambda: int4_weight_only(128, 11008, 4096, 128,
                                                                     x_fp32=True),
        "int8wo bf16-x 128x4096x4096": lambda: int8_weight_only(128, 4096, 4096),
        "int8wo bf16-x 512x4096x4096": lambda: int8_weight_only(512, 4096, 4096),
        # 2:4 + int: weights of 6.4-28 MB (values, meta, scales) in turn, over 300 MB in all
        "int4wo panels g128 1x4096x4096": lambda: int4_weight_only_panels(1, 4096, 4096, 128, 40),
        "int4wo panels g128 1x4096x11008": lambda: int4_weight_only_panels(1, 4096, 11008, 128,
                                                                           16),
        "sparse24 int4 g128 1x4096x11008": lambda: sparse24_quant(4096, 11008, 4, 40),
        "sparse24 int4 g128 1x4096x4096": lambda: sparse24_quant(4096, 4096, 4, 50),
        "sparse24 int8 1x4096x11008": lambda: sparse24_quant(4096, 11008, 8, 40),
        "sparse24 int8 1x4096x4096": lambda: sparse24_quant(4096, 4096, 8, 40),
        # the same on the 4-row panels of the layers (AVX512-BF16 and AMX builds from the
        # panels' introduction on), at decode and at a small batch
        "sparse24 int4 panels g128 1x4096x4096": lambda: sparse24_quant(4096, 4096, 4, 50,
                                                                        panels=True),
        "sparse24 int8 panels 1x4096x4096": lambda: sparse24_quant(4096, 4096, 8, 40, panels=True),
        "sparse24 int4 panels g128 8x4096x4096": lambda: sparse24_quant(4096, 4096, 4, 50, m=8,
                                                                        panels=True),
        "sparse24 int8 panels 4x4096x4096": lambda: sparse24_quant(4096, 4096, 8, 40, m=4,
                                                                   panels=True),
        "sparse24 int4 panels g128 L2 1x256x4096": lambda: sparse24_quant(256, 4096, 4, 1,
                                                                          panels=True),
        # the decode loops alone: 0.4-0.6 MB a weight, in L2
        "sparse24 int4 g128 L2 1x256x4096": lambda: sparse24_quant(256, 4096, 4, 1),
        "int4wo g128 fp32-x L2 1x256x4096": lambda: int4_weight_only(1, 256, 4096, 128, 1,
                                                                    x_fp32=True),
        # unstructured 70% bf16: 12 MB a weight (4096 x 4096) in turn; 0.8 MB (in L2)
        "unstructured bf16 1x4096x4096": lambda: unstructured(4096, 4096, 30),
        "unstructured bf16 L2 1x256x4096": lambda: unstructured(256, 4096, 1),
        # the float loop: fp32 values (an fp32 model's), and bf16 values against fp32 x
        "unstructured fp32 1x4096x4096": lambda: unstructured(4096, 4096, 15, values=torch.float32,
                                                              x_bf16=False),
        "unstructured fp32 L2 1x128x4096": lambda: unstructured(128, 4096, 1, values=torch.float32,
                                                                x_bf16=False),
        "unstructured bf16 fp32-x 4x4096x4096": lambda: unstructured(4096, 4096, 30, m=4,
                                                                     x_bf16=False),
    }


def _worker(so: str, nt: int, wanted: list) -> None:
    """Loads build `so` as pyquant._C, prepares the cases, then runs case i per stdin line."""
    spec = importlib.util.spec_from_file_location("pyquant._C", so)
    C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(C)
    sys.modules["pyquant._C"] = C
    import torch

    from pyquant import formats
    torch.manual_seed(0)
    torch.set_num_threads(nt)
    C.init()
    calls = [make() for name, make in _cases(C, torch, formats, nt).items() if name in wanted]
    for call in calls:
        if call() != 0:
            raise SystemExit(f"{so}: a call returned an error status")
    print("ready", flush=True)
    for line in sys.stdin:
        call = calls[int(line)]
        t0 = time.perf_counter()
        call()
        print(time.perf_counter() - t0, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="build A: a copy of pyquant/_C*.so")
    ap.add_argument("b", help="build B")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=11, help="calls per build and case")
    ap.add_argument("--cases", default="", help="substrings of the case names to run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch  # only for the case names; the workers build the inputs

    from pyquant import formats
    names = [n for n in _cases(None, torch, formats, 1)
             if not args.cases or any(c in n for c in args.cases.split(","))]
    if args.worker:
        return _worker(args.a, args.threads, names)
    procs = []
    for so in (args.a, args.b):
        p = subprocess.Popen([sys.executable, __file__, so, so, "--worker",
                              "--threads", str(args.threads), "--cases", args.cases],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker for {so} did not start")
        procs.append(p)

    def call(p, i):
        p.stdin.write(f"{i}\n")
        p.stdin.flush()
        return float(p.stdout.readline())

    print(f"{'case':34} {'A min/q1 ms':>18} {'B min/q1 ms':>18}  A/B (min, q1)")
    q = args.reps // 4
    for i, name in enumerate(names):
        ta, tb = [], []
        for _ in range(args.reps):
            ta.append(call(procs[0], i))
            tb.append(call(procs[1], i))
        ta.sort()
        tb.sort()
        print(f"{name:34} {ta[0] * 1e3:8.3f}/{ta[q] * 1e3:8.3f}  {tb[0] * 1e3:8.3f}/{tb[q] * 1e3:8.3f}"
              f"  {ta[0] / tb[0]:.2f}, {ta[q] / tb[q]:.2f}", flush=True)
    for p in procs:
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()
