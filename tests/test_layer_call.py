"""ops.LayerCall: a layer's calls after the first skip the checks of its own tensors and the
backend choice, and only while those tensors stay the same. Each test sets up the remembered
state with a first call and then changes one thing that must make the next call go the whole
way again (checks, backend choice), so a stale memory would show as a wrong product, a missing
error or a wrong backend."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import pyquant
from pyquant import ops
from helpers import LAYER_CONFIGS, native_available, one_layer

pytestmark = pytest.mark.skipif(not native_available(), reason="needs the native module")

def _layer(config, n=64, k=128):
    return one_layer(config, k, n)  # N = 64: the panel layout where this CPU has it


def _remembered(layer, x):
    """Two calls (the second one the short way); the op remembered."""
    layer(x)
    layer(x)
    return layer._layer_call.state[0]


def _spy(monkeypatch, backend: str, op: str) -> list:
    """A 1 for each call of ``backend``'s function for ``op`` (it still runs)."""
    seen, real = [], ops._REGISTRY[backend].impls[op]
    monkeypatch.setitem(ops._REGISTRY[backend].impls, op, lambda *a: seen.append(1) or real(*a))
    return seen


def _forward_args(layer, x):
    """(op, x, *args) that the layer's forward hands to _call_op."""
    got = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(layer), "_call_op",
                   lambda self, op, x_, *args: got.setdefault("a", (op, x_, *args)))
        layer(x)
    return got["a"]


@pytest.fixture
def whole_way_calls(monkeypatch):
    """How many calls went the whole way (ops.call, which runs the checks)."""
    n = []
    real = ops.call
    monkeypatch.setattr(ops, "call", lambda *a: n.append(1) or real(*a))
    return n


def _whole_way(layer, x):
    """The layer's product through ops.call (checks and backend choice every time)."""
    op, x_, *args = _forward_args(layer, x)
    return ops.call(op, x_, *args)


@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_remembered_calls_equal_the_whole_way(config, whole_way_calls):
    layer = _layer(config)
    with torch.inference_mode():
        for m in (1, 3, 17):
            x = torch.randn(m, layer.in_features)
            first = layer(x)
            before = len(whole_way_calls)
            second = layer(x)
            assert len(whole_way_calls) == before  # the short way: no checks, no choice
            assert torch.equal(first, second)
            assert torch.equal(second, _whole_way(layer, x))
        x3 = torch.randn(2, 5, layer.in_features).to(torch.bfloat16)
        assert torch.equal(layer(x3), _whole_way(layer, x3))


def test_an_op_name_built_at_run_time_is_remembered(whole_way_calls):
    """The op's name compared by value: a name built per call (a new string object each time)
    takes the remembered way as a literal one does."""
    layer = _layer(pyquant.Int4WeightOnly(group_size=64))
    op, x, *args = _forward_args(layer, torch.randn(3, 128))
    head, tail = op[:4], op[4:]
    call = ops.LayerCall()
    want = ops.call(op, x, *args)
    n = len(whole_way_calls)
    for _ in range(3):
        built = head + tail
        assert built == op and built is not op
        torch.testing.assert_close(call(built, x, *args), want, rtol=0, atol=0)
    assert len(whole_way_calls) == n + 1 and call.state is not None


def test_an_in_place_write_to_a_weight_is_seen():
    layer = _layer(pyquant.Int8WeightOnly())
    x = torch.randn(3, layer.in_features)
    with torch.inference_mode():
        before = layer(x)
        layer.weight_scale.mul_(2)  # values only: read as they are
        after = layer(x)
    assert torch.allclose(after, 2 * (before - layer.bias) + layer.bias, rtol=1e-5, atol=1e-5)


def test_a_replaced_buffer_is_checked_again():
    layer = _layer(pyquant.Int4WeightOnly(group_size=32))
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        layer(x)
        layer.weight_scales = layer.weight_scales.to(torch.float64)  # wrong dtype: the checks
        with pytest.raises(TypeError, match="weight_scales|scales"):
            layer(x)


def test_new_storage_under_the_same_tensor_is_checked_again(whole_way_calls):
    layer = _layer(pyquant.Int8WeightOnly())
    x = torch.randn(2, layer.in_features)
    with torch.inference_mode():
        before = layer(x)
        layer(x)
        calls = len(whole_way_calls)
        layer.weight_scale.data = layer.weight_scale.data * 3  # same object, new storage
        after = layer(x)
        assert len(whole_way_calls) == calls + 1
        assert torch.allclose(after - layer.bias, 3 * (before - layer.bias), rtol=1e-5,
                              atol=1e-5)


def test_a_forced_backend_is_obeyed_after_remembering(monkeypatch):
    layer = _layer(pyquant.Int4WeightOnly(group_size=32))
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        calls = _spy(monkeypatch, "reference", _remembered(layer, x))
        with pyquant.use_backend("reference"):
            layer(x)
        assert calls == [1]
        monkeypatch.setenv("PYQUANT_BACKEND", "reference")
        layer(x)
        assert calls == [1, 1]


@pytest.mark.parametrize("bad, err", [
    (lambda k: torch.randn(2, k + 1), ValueError),
    (lambda k: torch.randint(0, 3, (2, k)), TypeError),
    (lambda k: torch.randn(2, k, dtype=torch.float64), TypeError),
    (lambda k: torch.randn(2, k, device="meta"), ValueError),
])
def test_bad_x_after_remembering_gets_the_checks_error(bad, err):
    layer = _layer(pyquant.Int8Dynamic())
    with torch.inference_mode():
        layer(torch.randn(1, layer.in_features))
        layer(torch.randn(1, layer.in_features))
        with pytest.raises(err):
            layer(bad(layer.in_features))


def test_autograd_on_x_goes_through_the_dispatcher():
    layer = _layer(pyquant.Int8WeightOnly())
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        layer(x)
        layer(x)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    assert y.requires_grad
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_copies_and_pickles_start_empty():
    layer = _layer(pyquant.Int4WeightOnly(group_size=32))
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        y = layer(x)
        layer(x)
        twin = copy.deepcopy(layer)
        assert twin._layer_call.state is None
        assert torch.equal(twin(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back._layer_call.state is None
    with torch.inference_mode():
        assert torch.equal(back(x), y)
    assert pickle.loads(pickle.dumps(ops.LayerCall())).state is None


def test_a_resized_weight_is_checked_again():
    """resize_ keeps the tensor object (and here its storage) but changes the shape, which the
    checks look at."""
    layer = _layer(pyquant.Int8WeightOnly())
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        layer(x)
        layer(x)
    layer.weight_scale.resize_(layer.out_features - 1)
    with torch.inference_mode(), pytest.raises(ValueError, match="weight_scale|w_scale"):
        layer(x)


def test_compile_after_remembering_sees_one_op():
    layer = _layer(pyquant.Int8Dynamic())
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        y = layer(x)
        layer(x)
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), y)


def test_what_it_declines_it_forgets():
    """A call it does not remember (here: x on the meta device, refused) drops what it
    remembered, so no weights it no longer uses stay referenced (a model moved to another
    device runs there without being remembered)."""
    layer = _layer(pyquant.Int8WeightOnly())
    with torch.inference_mode():
        layer(torch.randn(1, layer.in_features))
        assert layer._layer_call.state is not None
        with pytest.raises(ValueError):
            layer(torch.randn(1, layer.in_features, device="meta"))
    assert layer._layer_call.state is None


def test_another_cpu_function_for_the_op_is_used(monkeypatch):
    layer = _layer(pyquant.Int8WeightOnly())
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        seen = _spy(monkeypatch, "cpu", _remembered(layer, x))
        layer(x)
        layer(x)
    assert seen == [1, 1]


def test_a_group_size_of_another_type_is_checked_again():
    layer = _layer(pyquant.Int4WeightOnly(group_size=32))
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        layer(x)
        layer(x)
        op, _, *args = _forward_args(layer, x)
        with pytest.raises(TypeError, match="group_size"):
            layer._call_op(op, x, *args[:3], 32.0, *args[4:])


# ------------------------------------------------- the weight-only panel ops' prepared call


def _panel_isas():
    from pyquant import _native

    return [n for n in ("avx512_amx", "avx512_bf16", "avx512_vnni")
            if n in _native.ISA_NAMES and _native.module().isa_available(
                _native.ISA_NAMES.index(n)) and _native.has_panel_kernels(
                _native.ISA_NAMES.index(n))]


def _panel_weights(op: str, n=64, k=256, g=64):
    from pyquant import formats, panels

    torch.manual_seed(1)
    w = torch.randn(n, k)
    if op.startswith("int8"):
        q, s = formats.quantize_int8_per_channel(w)
        return (panels.pack_int8(q), s, torch.randn(n))
    if op.startswith("int4"):
        c, s, z = formats.quantize_int4_groupwise(w, g, symmetric=False)
        return (*panels.pack_int4(formats.pack_int4(c), s, z, g), g, torch.randn(n))
    from pyquant import sparse_formats as sf, sparse_panels

    v, meta = sf.compress_24(w)
    if op.startswith("sparse24_int8"):
        q, s = sf.quantize_24_int8(v)
        return (*sparse_panels.pack(q, meta, 8), s, torch.randn(n))
    p, s, z = sf.quantize_24_int4(v, g)
    return (*sparse_panels.pack(p, meta, 4), s, z, g, torch.randn(n))


@pytest.mark.parametrize("op", ["int8_weight_only_mm_panels", "int8_dynamic_mm_panels",
                                "int4_weight_only_mm_panels", "int4_dynamic_mm_panels",
                                "sparse24_int8_mm_panels", "sparse24_int4_mm_panels"])
def test_bound_panel_calls_equal_the_whole_way(op):
    """bind(*weights)(x) against ops.call on every panel ISA: odd M (17: the 2:4 ops' dense
    path), 3-D, strided and bf16 x, an x with Inf (the weight-only ops' fixed point cannot
    hold it: the canonical rows run), an empty batch; then a write in place to the scales,
    which the prepared call must see."""
    from pyquant import _native, sparse_panels

    isas = _panel_isas()
    if op.startswith("sparse"):
        isas = [i for i in isas if sparse_panels.has_kernels(_native.ISA_NAMES.index(i))]
    if not isas:
        pytest.skip("no panel kernels on this CPU")
    args = _panel_weights(op)
    bind = ops._REGISTRY["cpu"].impls[op].bind
    for isa in isas:
        with _native.use_isa(isa), torch.inference_mode():
            run = bind(*args)
            assert run is not None
            xs = [torch.randn(m, 256) for m in (1, 3, 17)]
            xs += [torch.randn(2, 5, 256), torch.randn(3, 512)[:, ::2], torch.randn(0, 256)]
            # a bf16 model's rows: converted in the thread's scratch, the output rounded natively
            xs += [torch.randn(*shape).to(torch.bfloat16)
                   for shape in ((1, 256), (3, 256), (17, 256), (2, 5, 256), (0, 256))]
            inf = torch.randn(2, 256)
            inf[1, 7] = float("inf")
            xs += [inf, inf.to(torch.bfloat16)]
            for x in xs:
                want = ops.call(op, x, *args)  # bit for bit, NaN where Inf meets both signs
                torch.testing.assert_close(run(x), want, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{isa} {tuple(x.shape)} {x.dtype}")
    scales = args[2] if op.startswith("sparse") else args[1]
    x = torch.randn(1, 256)
    with torch.inference_mode():
        before = run(x)
        scales.mul_(2)
        after = run(x)
    assert torch.allclose(after, 2 * (before - args[-1]) + args[-1], rtol=1e-5, atol=1e-4)


def test_bind_declines_weights_it_would_copy():
    """A weight that is not 64-byte aligned (or a bias not in float32) would be copied for the
    kernel; a prepared call holding that copy would miss writes in place, so bind declines and
    the layer's calls take the function, which copies each time."""
    if not _panel_isas():
        pytest.skip("no panel kernels on this CPU")
    op = "int4_weight_only_mm_panels"
    codes, scales, zeros, g, bias = _panel_weights(op)
    raw = torch.empty(codes.numel() + 64, dtype=torch.uint8)
    off = (-raw.data_ptr() % 64) + 1  # one byte past a 64-byte boundary
    odd = raw[off:off + codes.numel()].view(codes.shape).copy_(codes)
    bind = ops._REGISTRY["cpu"].impls[op].bind
    assert bind(odd, scales, zeros, g, bias) is None
    assert bind(codes, scales, zeros, g, bias.to(torch.bfloat16)) is None
    assert bind(codes, scales, zeros, g, bias) is not None
    lc, x = ops.LayerCall(), torch.randn(1, 256)
    with torch.inference_mode():
        lc(op, x, odd, scales, zeros, g, bias)
        assert lc.state is not None and lc.state[6] is None
        odd[0].bitwise_xor_(0x11)  # in place: seen
        codes[0].bitwise_xor_(0x11)
        assert torch.equal(lc(op, x, odd, scales, zeros, g, bias),
                           ops.call(op, x, codes, scales, zeros, g, bias))


@pytest.mark.parametrize("op", ["sparse24_mm", "sparse_unstructured_mm"])
@pytest.mark.parametrize("vdtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bound_sparse_float_calls_equal_the_whole_way(op, vdtype):
    """The 2:4 and unstructured float ops' prepared call against ops.call on every ISA: bf16
    and fp32 x at odd M (17: past some dense break-evens), 3-D, strided and fp16 x, an empty
    batch; a write in place to the values is seen; a bias that would be converted declines."""
    from pyquant import _native, sparse_formats as sf

    torch.manual_seed(2)
    n, k = 40, 256
    w = torch.randn(n, k).to(vdtype)
    if op == "sparse24_mm":
        weights = sf.compress_24(w)
    else:
        mask = torch.rand(n, k) < 0.3
        weights = sf.compress_unstructured(w, mask)
    bias = torch.randn(n).to(vdtype)
    args = (*weights, bias)
    bind = ops._REGISTRY["cpu"].impls[op].bind
    f32_bias = args[:-1] + (bias.float(),)
    assert (bind(*args) is None) == (vdtype != torch.float32)  # a bf16 bias would be copied
    for isa in [i for i in _native.ISA_NAMES if _native.module().isa_available(
            _native.ISA_NAMES.index(i))]:
        with _native.use_isa(isa), torch.inference_mode():
            run = bind(*f32_bias)
            assert run is not None
            xs = [torch.randn(m, k).to(dt) for m in (1, 3, 17)
                  for dt in (torch.float32, torch.bfloat16)]
            xs += [torch.randn(2, 5, k), torch.randn(3, 2 * k)[:, ::2],
                   torch.randn(2, 5, k).to(torch.bfloat16),
                   torch.randn(2, k).to(torch.float16), torch.randn(0, k)]
            for x in xs:
                torch.testing.assert_close(run(x), ops.call(op, x, *f32_bias), rtol=0, atol=0,
                                           msg=f"{isa} {tuple(x.shape)} {x.dtype}")
    values = f32_bias[1] if op == "sparse_unstructured_mm" else f32_bias[0]
    x = torch.randn(1, k)
    with torch.inference_mode():
        before = run(x)
        values.mul_(2)
        after = run(x)
    torch.testing.assert_close(after, 2 * (before - f32_bias[-1]) + f32_bias[-1],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op,general", [("int8_dynamic_mm", "_run_int8_dynamic_mm"),
                                        ("int8_weight_only_mm", "_run_int8_weight_only_mm"),
                                        ("int8_dynamic_mm_panels",
                                         "_run_int8_dynamic_mm_panels"),
                                        ("int4_dynamic_mm_panels",
                                         "_run_int4_dynamic_mm_panels")])
def test_bound_calls_skip_the_general_path(op, general, monkeypatch):
    """The prepared call of float32 rows goes straight to the kernel: with the op's general
    path made to fail, it still answers (and its answer is the general path's)."""
    from pyquant import _native, _native_panels, formats, panels

    if not _native.has_panel_kernels(_native.current_isa()) and op.endswith("_panels"):
        pytest.skip("no panel kernels on this CPU")
    torch.manual_seed(4)
    n, k, g = 64, 256, 64
    w = torch.randn(n, k)
    if op.startswith("int8"):
        q, s = formats.quantize_int8_per_channel(w)
        args = (panels.pack_int8(q) if op.endswith("_panels") else q, s, torch.randn(n))
    else:
        c, s, z = formats.quantize_int4_groupwise(w, g, symmetric=False)
        args = (*panels.pack_int4(formats.pack_int4(c), s, z, g), g, torch.randn(n))
    x = torch.randn(3, k)
    with torch.inference_mode():
        want = ops.call(op, x, *args)
        run = ops._REGISTRY["cpu"].impls[op].bind(*args)
        mod = _native_panels if op.endswith("_panels") else _native

        def fail(*a, **kw):
            raise AssertionError("the general path ran")
        monkeypatch.setattr(mod, general, fail)
        assert torch.equal(run(x), want)


@pytest.mark.parametrize("n", [40, 64])
@pytest.mark.parametrize("op", ["int8_dynamic_mm", "int8_weight_only_mm"])
def test_bound_int8_calls_equal_the_whole_way(op, n):
    """int8_dynamic_mm's and int8_weight_only_mm's (canonical rows) prepared calls against
    ops.call on every ISA: odd M, 3-D, strided, bf16 (M = 17 and 10: the AMX tiles' bf16
    output, which the prepared call leaves to the general path) and fp16 x, an empty batch,
    an x with Inf; a write in place to the scales is seen; a bias that would be converted
    declines."""
    from pyquant import _native, formats

    torch.manual_seed(3)
    k = 256
    q, s = formats.quantize_int8_per_channel(torch.randn(n, k))
    bias = torch.randn(n)
    bind = ops._REGISTRY["cpu"].impls[op].bind
    assert bind(q, s, bias.to(torch.bfloat16)) is None
    for isa in [i for i in _native.ISA_NAMES if _native.module().isa_available(
            _native.ISA_NAMES.index(i))]:
        with _native.use_isa(isa), torch.inference_mode():
            run = bind(q, s, bias)
            xs = [torch.randn(m, k) for m in (1, 3, 17)]
            xs += [torch.randn(2, 5, k), torch.randn(3, 2 * k)[:, ::2],
                   torch.randn(2, k).to(torch.float16), torch.randn(0, k)]
            xs += [torch.randn(*shape).to(torch.bfloat16)
                   for shape in ((1, k), (2, k), (17, k), (2, 5, k))]
            inf = torch.randn(2, k)
            inf[0, 3] = float("inf")
            xs += [inf, inf.to(torch.bfloat16)]
            for x in xs:
                torch.testing.assert_close(run(x), ops.call(op, x, q, s, bias),
                                           rtol=0, atol=0, equal_nan=True,
                                           msg=f"{isa} {tuple(x.shape)} {x.dtype}")
    x = torch.randn(1, k)
    with torch.inference_mode():
        before = run(x)
        s.mul_(2)
        after = run(x)
    torch.testing.assert_close(after, 2 * (before - bias) + bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_models_3d_rows_take_the_prepared_call(monkeypatch, dtype):
    """A transformer's layers get [batch, tokens, K], fp32 or (a bf16 model's) bf16: contiguous
    rows of any rank go straight to the kernel (the general path, which flattens them and, for
    bf16, makes their fp32 copy and the rounded output with torch, is not called), with the
    dtype, shape and values the general path gives."""
    from pyquant import _native_panels

    if not _panel_isas():
        pytest.skip("no panel kernels on this CPU")
    op = "int4_weight_only_mm_panels"
    args = _panel_weights(op)
    run = ops._REGISTRY["cpu"].impls[op].bind(*args)
    x = torch.randn(2, 3, 256).to(dtype)
    with torch.inference_mode():
        want = ops.call(op, x, *args)
        general = []
        real = _native_panels._run_weight_only
        monkeypatch.setattr(_native_panels, "_run_weight_only",
                            lambda *a: general.append(1) or real(*a))
        got = run(x)
        assert general == [] and got.dtype == dtype and got.shape == (2, 3, 64)
        assert torch.equal(got, want)
        run(x.transpose(0, 1))  # not contiguous: the general path
        assert general == [1]


@pytest.mark.parametrize("shape, m", [((1, 40), 1), ((3, 40), 3), ((2, 3, 40), 6),
                                      ((2, 1, 3, 40), 6), ((40,), 0), ((0, 40), 0),
                                      ((2, 0, 40), 0), ((3, 0), 0), ((1, 2, 0, 40), 0)])
def test_rows_out_gives_rows_and_the_output_of_every_rank(shape, m):
    """The bound calls' first step: contiguous x of two or more dims -> (rows, a new float32
    output of x's leading shape and N columns); 1-D and empty x -> (0, None), the general
    path's to handle."""
    from pyquant import _native

    got_m, out = _native._rows_out(torch.randn(*shape), 7)
    assert got_m == m
    if m:
        assert out.shape == shape[:-1] + (7,) and out.dtype == torch.float32
        assert out.is_contiguous()
    else:
        assert out is None


def test_rows_out_refuses_strided_x():
    from pyquant import _native

    x = torch.randn(4, 80)[:, ::2]
    assert _native._rows_out(x, 7) == (0, None)
    assert _native._rows_out(torch.randn(3, 2, 40).transpose(0, 1), 7) == (0, None)


def test_a_backend_forced_on_another_thread_leaves_this_one_alone():
    """use_backend is per thread: while one thread is inside it (the fast check of _forced
    then steps aside), another thread's calls still choose their backend themselves."""
    import threading

    inside, release = threading.Event(), threading.Event()

    def hold():
        with pyquant.use_backend("reference"):
            assert ops._forced() == "reference"
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(10)
        assert ops._forcing == 1 and ops._forced() is None
    finally:
        release.set()
        t.join()
    assert ops._forcing == 0 and ops._forced() is None


def test_current_isa_before_anything_is_loaded_asks_the_module(monkeypatch):
    """The fast answer of current_isa is for a module already asked; before that (a fresh
    process, or another module) it asks, never answers the ISA of nothing (portable)."""
    from pyquant import _native

    monkeypatch.setattr(_native, "_best_isa", (None, 0))
    assert _native.current_isa() == _native.module().best_isa()
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_loaded", True)
    monkeypatch.setattr(_native, "_load_error", "ImportError: gone")
    monkeypatch.setattr(_native, "_best_isa", (None, 0))
    with pytest.raises(RuntimeError, match="not loaded"):
        _native.current_isa()


def test_native_bf16_conversions_round_as_torch():
    """The bound calls' bf16 conversions (csrc/cpu/convert_bf16.cpp) against torch's own: rows
    with a stride past K to fp32 exactly; fp32 to bf16 at nearest, ties to even, bit for bit
    on finite values (ties, subnormals, the largest finite that rounds up to Inf) and
    infinities, NaN to NaN; bad arguments refused."""
    from pyquant import _native

    mod = _native.module()
    src = torch.randn(3, 40).to(torch.bfloat16)
    dst = torch.empty(3, 33)
    assert mod.bf16_to_f32_rows(src.data_ptr(), 3, 33, 40, dst.data_ptr()) == 0
    assert torch.equal(dst, src[:, :33].float())
    special = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 2 ** -130,
                            -(2 ** -133), 3.3895313892515355e38, 3.4028234663852886e38,
                            float("inf"), -float("inf"), 0.0, -0.0, 65504.0],
                           dtype=torch.float32)
    x = torch.cat([special, torch.randn(4000) * 10.0 ** torch.randint(-40, 38, (4000,))])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    assert mod.f32_to_bf16(x.data_ptr(), x.numel(), y.data_ptr()) == 0
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    nan = torch.tensor([float("nan"), -float("nan")])
    yn = torch.empty(2, dtype=torch.bfloat16)
    assert mod.f32_to_bf16(nan.data_ptr(), 2, yn.data_ptr()) == 0 and yn.isnan().all()
    assert mod.f32_to_bf16(x.data_ptr(), -1, y.data_ptr()) != 0
    assert mod.bf16_to_f32_rows(src.data_ptr(), 3, 41, 40, dst.data_ptr()) != 0
    assert mod.bf16_to_f32_rows(0, 3, 33, 40, dst.data_ptr()) != 0


def test_bf16_rows_past_the_threshold_take_torchs_conversions(monkeypatch):
    """bf16 rows up to _BF16_BOUND_MAX_M take the native conversions (one thread: faster at
    decode, where the Python around the call dominates); more rows take the general path,
    whose torch conversions use every thread; nothing is allocated for them first."""
    from pyquant import _native, _native_panels

    if not _panel_isas():
        pytest.skip("no panel kernels on this CPU")
    op = "int4_weight_only_mm_panels"
    args = _panel_weights(op)
    run = ops._REGISTRY["cpu"].impls[op].bind(*args)
    top = _native._BF16_BOUND_MAX_M
    assert _native._rows_out(torch.randn(2, top, 8), 5, max_m=top)[0] == 0
    assert _native._rows_out(torch.randn(top, 8), 5, max_m=top)[0] == top
    xs = [torch.randn(m, 256).to(torch.bfloat16) for m in (top, top + 1)]
    with torch.inference_mode():
        wants = [ops.call(op, x, *args) for x in xs]
        general = []
        real = _native_panels._run_weight_only
        monkeypatch.setattr(_native_panels, "_run_weight_only",
                            lambda *a: general.append(a[1].shape[0]) or real(*a))
        for x, want in zip(xs, wants):
            assert torch.equal(run(x), want)
    assert general == [top + 1]
