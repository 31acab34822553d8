"""Nothing a user can pass segfaults (house rule 7).

Each group of hostile calls runs in a SUBPROCESS, so a crash in native code is a failed test
that names the last call, not a dead pytest. Every call must either return or raise
ValueError / TypeError / RuntimeError; wrong-but-defined results (NaN in, int8 -128, int4
zero points > 15) are allowed, crashes and other exceptions are not.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import pyquant

SCRIPT = textwrap.dedent(r'''
    import json, sys, traceback
    import torch
    import pyquant
    from pyquant import _native, formats

    GROUP = sys.argv[1]
    ALLOWED = (ValueError, TypeError, RuntimeError)
    stats = {"calls": 0, "returned": 0, "raised": 0}
    problems = []

    def attempt(name, fn, expect_status=None, must_raise=False):
        stats["calls"] += 1
        sys.stderr.write(f"CALL {name}\n")
        sys.stderr.flush()
        try:
            r = fn()
        except ALLOWED as e:
            stats["raised"] += 1
            if not str(e):
                problems.append(f"{name}: {type(e).__name__} without a message")
            return
        except BaseException as e:
            problems.append(f"{name}: {type(e).__name__}: {e}")
            return
        if must_raise:
            problems.append(f"{name}: an invalid call returned instead of raising")
            return
        stats["returned"] += 1
        if expect_status is not None and r != expect_status:
            problems.append(f"{name}: native status {r!r}, expected {expect_status}")

    g = torch.Generator().manual_seed(0)
    def xf(*shape): return torch.randn(*shape, generator=g)
    def i8(*shape): return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    def u8(*shape, hi=256): return torch.randint(0, hi, shape, generator=g, dtype=torch.uint8)
    def sc(*shape): return torch.rand(*shape, generator=g) + 0.01
    meta = torch.device("meta")
    OPS = torch.ops.pyquant

    def contexts():
        """The reference backend, then the native one on every ISA this CPU has."""
        yield "reference", lambda: pyquant.use_backend("reference")
        if _native.available():
            for i, isa in enumerate(_native.ISA_NAMES):
                if _native.module().isa_available(i):
                    def ctx(isa=isa):
                        import contextlib
                        st = contextlib.ExitStack()
                        st.enter_context(pyquant.use_backend("cpu"))
                        st.enter_context(_native.use_isa(isa))
                        return st
                    yield f"cpu-{isa}", ctx

    def op_cases():
        """(name, thunk) calls of the torch ops: hostile but type-correct Python values."""
        K, N = 64, 12
        w, s = i8(N, K), sc(N)
        p, s4, z4 = u8(N, K // 2), sc(N, K // 32), u8(N, K // 32, hi=16)
        big = xf(1, 1 << 20)
        for op in ("int8_weight_only_mm", "int8_dynamic_mm"):
            f = getattr(OPS, op)
            yield f"{op}/M0", lambda f=f: f(xf(0, K), w, s, None)
            yield f"{op}/N0", lambda f=f: f(xf(3, K), i8(0, K), sc(0), None)
            yield f"{op}/K0", lambda f=f: f(xf(3, 0), i8(N, 0), s, None)
            yield f"{op}/all0", lambda f=f: f(xf(0, 0), i8(0, 0), sc(0), None)
            yield f"{op}/3d_empty", lambda f=f: f(xf(0, 5, K), w, s, None)
            yield f"{op}/x_1d", lambda f=f: f(xf(K), w, s, None)
            yield f"{op}/x_0d", lambda f=f: f(torch.tensor(1.0), w, s, None)
            yield f"{op}/huge_K_small_w", lambda f=f: f(big, w, s, None)
            yield f"{op}/huge_w_small_x", lambda f=f: f(xf(2, K), i8(2, 1 << 20), sc(2), None)
            yield f"{op}/scale_short", lambda f=f: f(xf(2, K), w, sc(1), None)
            yield f"{op}/bias_short", lambda f=f: f(xf(2, K), w, s, xf(1))
            yield f"{op}/w_noncontig", lambda f=f: f(xf(5, K), i8(N, 2 * K)[:, ::2], s, None)
            yield f"{op}/w_transposed", lambda f=f: f(xf(5, K), i8(K, N).t(), s, None)
            yield f"{op}/x_expanded", lambda f=f: f(xf(1, K).expand(7, K), w, s, None)
            yield f"{op}/x_stride0_k", lambda f=f: f(xf(7, 1).expand(7, K), w, s, None)
            yield f"{op}/x_nan_inf", lambda f=f: f(torch.tensor([[float("nan")] * K, [float("inf")] * K, [-float("inf")] + [1.0] * (K - 1)]), w, s, None)
            yield f"{op}/w_minus128", lambda f=f: f(xf(3, K), torch.full((N, K), -128, dtype=torch.int8), s, None)
            yield f"{op}/scale_nan_neg_zero", lambda f=f: f(xf(3, K), w, torch.tensor([float("nan"), -1.0, 0.0] * 4), None)
            yield f"{op}/bias_inf", lambda f=f: f(xf(3, K), w, s, torch.full((N,), float("inf")))
            yield f"{op}/x_int", lambda f=f: f(torch.ones(3, K, dtype=torch.int64), w, s, None)
            yield f"{op}/x_f64", lambda f=f: f(xf(3, K).double(), w, s, None)
            yield f"{op}/w_float", lambda f=f: f(xf(3, K), xf(N, K), s, None)
            yield f"{op}/w_meta", lambda f=f: f(xf(3, K), w.to(meta), s, None)
            yield f"{op}/all_meta", lambda f=f: f(xf(3, K).to(meta), w.to(meta), s.to(meta), None)
            yield f"{op}/x_f16_huge", lambda f=f: f(torch.full((2, K), 60000.0, dtype=torch.float16), torch.full((N, K), 127, dtype=torch.int8), torch.full((N,), 1.0), None)
        f = OPS.int4_weight_only_mm
        yield "int4/M0", lambda: f(xf(0, K), p, s4, z4, 32, None)
        yield "int4/N0", lambda: f(xf(3, K), u8(0, K // 2), sc(0, 2), u8(0, 2), 32, None)
        yield "int4/K0", lambda: f(xf(3, 0), u8(N, 0), sc(N, 0), u8(N, 0), 32, None)
        yield "int4/huge_K_small_w", lambda: f(big, p, s4, z4, 32, None)
        yield "int4/huge_group", lambda: f(xf(3, K), p, s4, z4, 1 << 40, None)
        for gs in (0, -2, 3, True, 1 << 62):
            yield f"int4/group_{gs}", lambda gs=gs: f(xf(3, K), p, s4, z4, gs, None)
        for gs in (2, 4, 6, 16, K):  # even, legal for the op, odd-sized groups for the kernels
            yield f"int4/group_{gs}_legal", lambda gs=gs: f(xf(3, 48 if gs == 6 else K), u8(N, (48 if gs == 6 else K) // 2), sc(N, (48 if gs == 6 else K) // gs), u8(N, (48 if gs == 6 else K) // gs, hi=16), gs, None)
        yield "int4/scales_short", lambda: f(xf(3, K), p, sc(N, 1), z4, 32, None)
        yield "int4/zeros_short", lambda: f(xf(3, K), p, s4, u8(1, 2), 32, None)
        yield "int4/zeros_gt_15", lambda: f(xf(3, K), p, s4, torch.full((N, 2), 255, dtype=torch.uint8), 32, None)
        yield "int4/w_noncontig", lambda: f(xf(3, K), u8(N, K)[:, ::2], s4, z4, 32, None)
        yield "int4/scales_noncontig", lambda: f(xf(3, K), p, sc(N, 4)[:, ::2], u8(N, 4, hi=16)[:, ::2], 32, None)
        yield "int4/x_nan_inf", lambda: f(torch.tensor([[float("nan")] * K, [float("inf")] * K]), p, s4, z4, 32, None)
        yield "int4/w_int8", lambda: f(xf(3, K), p.view(torch.int8), s4, z4, 32, None)
        yield "int4/x_expanded", lambda: f(xf(1, K).expand(9, K), p, s4, z4, 32, None)
        yield "int4/all_meta", lambda: f(xf(3, K).to(meta), p.to(meta), s4.to(meta), z4.to(meta), 32, None)

    # Invalid direct calls into pyquant._native: these must raise (a wrong shape reaching C
    # is an out-of-bounds read), not silently compute on misread memory.
    NATIVE_MUST_RAISE = {
        "gemm/float_inputs", "gemm/1d", "gemm/huge_K_small_w", "quant/1d",
        "w8/x_narrower_than_w", "w8/scale_short", "w8/bias_short", "dyn/scale_short",
        "dyn/w_float", "int4/scales_short", "int4/zeros_short", "int4/group_odd",
        "int4/group_zero",
    }

    def native_cases():
        """pyquant._native's Python functions called directly, skipping the op's checks."""
        K, N = 64, 12
        w, s = i8(N, K), sc(N)
        p, s4, z4 = u8(N, K // 2), sc(N, K // 32), u8(N, K // 32, hi=16)
        nat = _native
        yield "gemm/empty", lambda: nat.int8_gemm_s32(i8(0, K), i8(0, K))
        yield "gemm/K0", lambda: nat.int8_gemm_s32(i8(3, 0), i8(4, 0))
        yield "gemm/minus128", lambda: nat.int8_gemm_s32(torch.full((3, K), -128, dtype=torch.int8), torch.full((5, K), -128, dtype=torch.int8))
        yield "gemm/noncontig", lambda: nat.int8_gemm_s32(i8(3, 2 * K)[:, ::2], i8(K, 5).t())
        yield "gemm/float_inputs", lambda: nat.int8_gemm_s32(xf(3, K), xf(5, K))
        yield "gemm/1d", lambda: nat.int8_gemm_s32(i8(K), i8(5, K))
        yield "gemm/huge_K_small_w", lambda: nat.int8_gemm_s32(i8(1, 1 << 24), i8(4, 1))
        yield "quant/empty", lambda: nat.quantize_rows_int8(xf(0, 5))
        yield "quant/K0", lambda: nat.quantize_rows_int8(xf(5, 0))
        yield "quant/1d", lambda: nat.quantize_rows_int8(xf(5))
        yield "quant/nan_inf", lambda: nat.quantize_rows_int8(torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0], [-float("inf"), float("nan")]]))
        yield "quant/int", lambda: nat.quantize_rows_int8(torch.ones(3, 4, dtype=torch.int32))
        yield "quant/expanded", lambda: nat.quantize_rows_int8(xf(1, 33).expand(4, 33))
        yield "w8/ok", lambda: nat.int8_weight_only_mm(xf(3, K), w, s, None)
        yield "w8/x_narrower_than_w", lambda: nat.int8_weight_only_mm(xf(64, 16), i8(8, 1 << 14), sc(8), None)
        yield "w8/scale_short", lambda: nat.int8_weight_only_mm(xf(1, 1), i8(1 << 22, 1), sc(1), None)
        yield "w8/bias_short", lambda: nat.int8_weight_only_mm(xf(1, 1), i8(1 << 22, 1), sc(1 << 22), xf(1))
        yield "dyn/scale_short", lambda: nat.int8_dynamic_mm(xf(1, 1), i8(1 << 22, 1), sc(1), None)
        yield "dyn/w_float", lambda: nat.int8_dynamic_mm(xf(2, K), xf(N, K), s, None)
        yield "int4/scales_short", lambda: nat.int4_weight_only_mm(xf(1, 2), u8(1 << 22, 1), sc(1, 1), u8(1 << 22, 1), 2, None)
        yield "int4/zeros_short", lambda: nat.int4_weight_only_mm(xf(1, 2), u8(1 << 22, 1), sc(1 << 22, 1), u8(1, 1), 2, None)
        yield "int4/group_odd", lambda: nat.int4_weight_only_mm(xf(3, K), p, s4, z4, 3, None)
        yield "int4/group_zero", lambda: nat.int4_weight_only_mm(xf(3, K), p, s4, z4, 0, None)

    def raw_cases():
        """pyquant._C itself, with null pointers, negative sizes, bad strides and group sizes:
        the C API's own checks must answer with a status, never touch memory."""
        C = _native.module()
        x = xf(4, 64); w = i8(8, 64); s = sc(8); out = torch.empty(4, 8)
        q = i8(4, 64); xs = sc(4); acc = torch.empty(4, 8, dtype=torch.int32)
        p = u8(8, 32); s4 = sc(8, 2); z4 = u8(8, 2, hi=16)
        X, W, S, O = x.data_ptr(), w.data_ptr(), s.data_ptr(), out.data_ptr()
        Q, XS, A = q.data_ptr(), xs.data_ptr(), acc.data_ptr()
        P, S4, Z4 = p.data_ptr(), s4.data_ptr(), z4.data_ptr()
        ERR_ARG, ERR_ISA = 1, 2
        for isa in range(len(_native.ISA_NAMES)):
            if not C.isa_available(isa):
                continue
            t = f"isa{isa}"
            yield f"{t}/w8/ok", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 64, W, 8, S, 0, O, 2)), 0
            yield f"{t}/w8/null_x", (lambda isa=isa: C.int8_weight_only_mm(isa, 0, 4, 64, 64, W, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/null_w", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 64, 0, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/null_scale", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 64, W, 8, 0, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/null_out", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 64, W, 8, S, 0, 0, 1)), ERR_ARG
            yield f"{t}/w8/neg_M", (lambda isa=isa: C.int8_weight_only_mm(isa, X, -1, 64, 64, W, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/neg_K", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, -64, 64, W, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/neg_N", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 64, W, -8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/ldx_lt_K", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 63, W, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/overflow", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 1 << 40, 1 << 40, 1 << 40, W, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/w8/null_all_empty", (lambda isa=isa: C.int8_weight_only_mm(isa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)), 0
            yield f"{t}/w8/threads_0", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 64, W, 8, S, 0, O, 0)), 0
            yield f"{t}/w8/threads_neg", (lambda isa=isa: C.int8_weight_only_mm(isa, X, 4, 64, 64, W, 8, S, 0, O, -5)), 0
            yield f"{t}/quant/null_x", (lambda isa=isa: C.quantize_rows_int8(isa, 0, 4, 64, 64, Q, XS, 1)), ERR_ARG
            yield f"{t}/quant/null_xq", (lambda isa=isa: C.quantize_rows_int8(isa, X, 4, 64, 64, 0, XS, 1)), ERR_ARG
            yield f"{t}/quant/null_scale", (lambda isa=isa: C.quantize_rows_int8(isa, X, 4, 64, 64, Q, 0, 1)), ERR_ARG
            yield f"{t}/quant/neg_K", (lambda isa=isa: C.quantize_rows_int8(isa, X, 4, -1, 64, Q, XS, 1)), ERR_ARG
            yield f"{t}/quant/ldx_lt_K", (lambda isa=isa: C.quantize_rows_int8(isa, X, 4, 64, 1, Q, XS, 1)), ERR_ARG
            yield f"{t}/gemm/null_acc", (lambda isa=isa: C.int8_gemm_s32(isa, Q, 4, 64, W, 8, 0, 1)), ERR_ARG
            yield f"{t}/gemm/neg_N", (lambda isa=isa: C.int8_gemm_s32(isa, Q, 4, 64, W, -8, A, 1)), ERR_ARG
            yield f"{t}/gemm/overflow", (lambda isa=isa: C.int8_gemm_s32(isa, Q, 1 << 62, 1 << 62, W, 8, A, 1)), ERR_ARG
            yield f"{t}/dyn/null_xscale", (lambda isa=isa: C.int8_dynamic_mm(isa, Q, 0, 4, 64, W, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/dyn/null_wscale", (lambda isa=isa: C.int8_dynamic_mm(isa, Q, XS, 4, 64, W, 8, 0, 0, O, 1)), ERR_ARG
            yield f"{t}/dyn/neg_M", (lambda isa=isa: C.int8_dynamic_mm(isa, Q, XS, -4, 64, W, 8, S, 0, O, 1)), ERR_ARG
            yield f"{t}/int4/ok", (lambda isa=isa: C.int4_weight_only_mm(isa, X, 4, 64, 64, P, 8, S4, Z4, 32, 0, O, 2)), 0
            for gs in (0, -32, 31, 1, 48, 128):
                yield f"{t}/int4/group_{gs}", (lambda isa=isa, gs=gs: C.int4_weight_only_mm(isa, X, 4, 64, 64, P, 8, S4, Z4, gs, 0, O, 1)), ERR_ARG
            yield f"{t}/int4/null_zeros", (lambda isa=isa: C.int4_weight_only_mm(isa, X, 4, 64, 64, P, 8, S4, 0, 32, 0, O, 1)), ERR_ARG
            yield f"{t}/int4/null_scales", (lambda isa=isa: C.int4_weight_only_mm(isa, X, 4, 64, 64, P, 8, 0, Z4, 32, 0, O, 1)), ERR_ARG
            yield f"{t}/int4/neg_N", (lambda isa=isa: C.int4_weight_only_mm(isa, X, 4, 64, 64, P, -8, S4, Z4, 32, 0, O, 1)), ERR_ARG
            yield f"{t}/int4/odd_K", (lambda isa=isa: C.int4_weight_only_mm(isa, X, 4, 63, 64, P, 8, S4, Z4, 2, 0, O, 1)), ERR_ARG
        for bad_isa in (-1, len(_native.ISA_NAMES), 99, 1 << 30):
            yield f"isa_{bad_isa}/w8", (lambda b=bad_isa: C.int8_weight_only_mm(b, X, 4, 64, 64, W, 8, S, 0, O, 1)), ERR_ISA
            yield f"isa_{bad_isa}/int4", (lambda b=bad_isa: C.int4_weight_only_mm(b, X, 4, 64, 64, P, 8, S4, Z4, 32, 0, O, 1)), ERR_ISA
            yield f"isa_{bad_isa}/available", (lambda b=bad_isa: C.isa_available(b)), 0
        yield "isa_name_bad", (lambda: C.isa_name(77)), "unknown"
        # pybind11 rejects what is not an int before C is reached
        yield "w8/str_pointer", (lambda: C.int8_weight_only_mm(0, "x", 4, 64, 64, W, 8, S, 0, O, 1)), None
        yield "w8/neg_pointer", (lambda: C.int8_weight_only_mm(0, -1, 4, 64, 64, W, 8, S, 0, O, 1)), None

    if GROUP == "ops":
        for ctx_name, ctx in contexts():
            for name, fn in op_cases():
                def run(fn=fn, ctx=ctx):
                    with ctx():
                        return fn()
                attempt(f"{ctx_name}:{name}", run)
            with pyquant.use_backend("reference"):
                pass
    elif GROUP == "native":
        for ctx_name, ctx in contexts():
            if ctx_name == "reference":
                continue
            for name, fn in native_cases():
                def run(fn=fn, ctx=ctx):
                    with ctx():
                        return fn()
                attempt(f"{ctx_name}:{name}", run, must_raise=name in NATIVE_MUST_RAISE)
    elif GROUP == "raw":
        for name, fn, want in raw_cases():
            attempt(name, fn, expect_status=want)
    else:
        raise SystemExit(f"unknown group {GROUP}")

    print(json.dumps({"stats": stats, "problems": problems}))
    sys.exit(1 if problems else 0)
''')


def _run_group(group: str, tmp_path) -> dict:
    script = tmp_path / "no_crash.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    # The child imports the same pyquant as this process.
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyquant.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYQUANT_QUIET"] = "1"
    env.pop("PYQUANT_BACKEND", None)
    env.pop("PYQUANT_CPU_ISA", None)
    proc = subprocess.run([sys.executable, str(script), group], capture_output=True, text=True,
                          env=env, timeout=300)
    calls = [ln[5:] for ln in proc.stderr.splitlines() if ln.startswith("CALL ")]
    last = calls[-1] if calls else "<none>"
    assert proc.returncode >= 0, (
        f"subprocess died with signal {-proc.returncode} during call {last!r}\n"
        f"stderr tail:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no summary (rc={proc.returncode}, last call {last!r}):\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and not summary["problems"], (
        f"rc={proc.returncode}; problems:\n" + "\n".join(summary["problems"]))
    return summary["stats"]


def test_torch_ops_never_crash(tmp_path):
    stats = _run_group("ops", tmp_path)
    assert stats["calls"] >= 70 and stats["returned"] > 0 and stats["raised"] > 0, stats


@pytest.mark.skipif(not pyquant._native.available(), reason="native module not loaded")
def test_native_functions_never_crash(tmp_path):
    stats = _run_group("native", tmp_path)
    assert stats["calls"] >= 20, stats


@pytest.mark.skipif(not pyquant._native.available(), reason="native module not loaded")
def test_raw_c_api_checks_arguments(tmp_path):
    stats = _run_group("raw", tmp_path)
    assert stats["calls"] >= 40, stats
