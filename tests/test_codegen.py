"""The VNNI panel loops' code as the compiler emits it for the AVX512-BF16 build.

Why a test of generated code: written over an array (`__m512i acc[T][2]`), GCC 12 carried the
tile's accumulators through the k loop in a chain of register copies, two `vmovdqa` for every
`vpdpbusd`, and int8 dynamic ran 1.3-1.4x slower at prefill on a Zen 4 for it; the results were
the same bit for bit, so no other test saw it. `PanelRows` (csrc/cpu/tile_vnni_panel.h) keeps
them in registers. This compiles csrc/cpu/kernels.cpp (and sparse.cpp) as the build does for
AVX512-BF16 (its flags, OpenMP, `-S`: nothing runs, so any x86-64 machine with g++ checks it)
and counts, in every innermost loop of the W8A8 and W4A8 panel drivers (and of the 2:4 + int8
panels at M > 1), the register-to-register vector copies against the products. Skipped without a C++ compiler that takes the flags."""
from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COPY = re.compile(r"\bvmovdq[au](32|64)\s+%zmm\d+,\s*%zmm\d+")
LABEL = re.compile(r"^([\w.$]+):$", re.M)


def _loop_build():
    spec = importlib.util.spec_from_file_location("_loop_build", ROOT / "benchmarks" / "_loop_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def functions(asm: str, *parts: str) -> dict[str, list[str]]:
    """The bodies (lines) of the functions of GCC's assembly whose mangled name holds every one
    of `parts`."""
    out = {}
    for m in LABEL.finditer(asm):
        name = m.group(1)
        if name.startswith(".") or not all(p in name for p in parts):
            continue
        out[name] = asm[m.end():].split(".cfi_endproc", 1)[0].splitlines()
    return out


STACK = re.compile(r"\bvmov\w+\s+(%zmm\d+,\s*)?-?\w*\(%r[sb]p\)(,\s*%zmm\d+)?")


def innermost_loops(body: list[str]) -> list[tuple[int, int, int]]:
    """(products, copies, stack moves) of each loop that holds no other loop: the lines from a
    label back to the last jump to it."""
    where = {line.strip()[:-1]: i for i, line in enumerate(body) if re.match(r"\.L\w+:$", line.strip())}
    spans = []
    for i, line in enumerate(body):
        jump = re.match(r"\s+j\w+\s+(\.L\w+)$", line)
        if jump and where.get(jump.group(1), i) < i:
            spans.append((where[jump.group(1)], i))
    inner = [(a, b) for a, b in spans
             if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [(sum("vpdpbusd" in s for s in body[a:b + 1]),
             sum(bool(COPY.search(s)) for s in body[a:b + 1]),
             sum(bool(STACK.search(s)) and "zmm" in s for s in body[a:b + 1])) for a, b in inner]


def _asm(tmp_path_factory, source: str) -> str:
    """csrc/cpu/<source> compiled to assembly as the AVX512-BF16 build compiles it."""
    lb = _loop_build()
    cxx = lb.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (set CXX)")
    out = tmp_path_factory.mktemp("codegen") / (source + ".s")
    cmd = [cxx, "-DPQ_NS=pq_avx512bf16", "-O3", "-DNDEBUG", "-ffp-contract=off", "-fopenmp",
           *lb.FLAGS, "-S", str(ROOT / "csrc" / "cpu" / source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"{cxx} does not take the AVX512-BF16 build's flags: {proc.stderr[-300:]}")
    return out.read_text()


@pytest.fixture(scope="module")
def kernels_asm(tmp_path_factory):
    return _asm(tmp_path_factory, "kernels.cpp")


@pytest.mark.parametrize("driver", ["w8a8_panel_gemm", "w8a8_fx24_panel_mm", "w4a8_panel_driver"])
def test_panel_loops_keep_their_accumulators_in_registers(kernels_asm, driver):
    """Every innermost loop of the driver's tiles that holds 12 products or more (a 6-row W8A8
    tile takes 12 a step, W4A8's nibble loop 24): at most one copy per four products (the array
    form had two per product)."""
    bodies = functions(kernels_asm, "for_each_panel", driver)
    assert bodies, f"no for_each_panel function of {driver} in kernels.cpp's assembly"
    loops = [(name, lp) for name, body in bodies.items() for lp in innermost_loops(body)
             if lp[0] >= 12]
    assert loops, driver
    bad = [(name[:80], n, copies) for name, (n, copies, _) in loops if copies * 4 > n]
    assert not bad, bad


@pytest.fixture(scope="module")
def sparse_asm(tmp_path_factory):
    return _asm(tmp_path_factory, "sparse.cpp")


@pytest.mark.parametrize("op,products,per", [("sparse24_int8_panels_mm", 14, 3),
                                             ("sparse24_int4_panels_mm", 56, 4)])
def test_sparse24_panel_loops_at_m_above_1_keep_their_accumulators_in_registers(
        sparse_asm, op, products, per):
    """The 2:4 panel loops of two rows of x, both pairs a pass (dot24_i8_panel<2>: 12 products
    and 2 biases a step; dot24_i4_quad_rows<2, 4>: 14 a step, a block of 4 steps unrolled, its
    14 accumulators cleared a block), in sparse.cpp's build: no accumulator on the stack and at
    most one copy per `per` products. With their accumulators in arrays they went through copy
    chains (int8: 40 copies to 7 products, a pair at a time), and picked by a reference chosen
    at run time through the stack (23-41 moves a turn); 1.3-1.7x slower at M = 2-16 either
    way."""
    # inlined into the op's driver, or out of line
    kernel = "dot24_i8_panel" if "int8" in op else "dot24_i4_quad_rows"
    bodies = {**functions(sparse_asm, "run_panels24", op), **functions(sparse_asm, kernel)}
    loops = [lp for body in bodies.values() for lp in innermost_loops(body)
             if lp[0] >= products and lp[0] % 14 == 0]
    assert loops, f"no loop of {products}+ products in {op}'s driver or {kernel}"
    assert all(stack == 0 and copies * per <= n for n, copies, stack in loops), loops
