"""pyquant.formats: the canonical int8/int4 formats. Packing must be lossless; quantization
error is measured here as SQNR floors (helpers.SQNR_FLOORS_DB) and as per-element bounds,
separately from any kernel (house rule 3)."""
from __future__ import annotations

import pytest
import torch

from helpers import (
    INT4_GROUP_SIZES,
    SQNR_FLOORS_DB,
    gaussian_weight,
    gen,
    heavy_tailed_weight,
    outlier_channel_weight,
    outlier_feature_weight,
    sqnr_db,
)
from pyquant import formats

SEEDS = (0, 1, 2)
# One fp32 rounding of w / scale and of scale * code: a relative slack on the half-step bound.
_HALF_STEP_SLACK = 1 + 1e-5


# ----------------------------------------------------------------------------- int4 packing


def test_pack_int4_layout():
    """Byte j of row n = code[n, 2j] | code[n, 2j + 1] << 4 (low nibble = even k)."""
    codes = torch.tensor([[1, 2, 15, 0, 7, 8], [0, 15, 9, 3, 10, 11]], dtype=torch.uint8)
    packed = formats.pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x0F, 0x87], [0xF0, 0x39, 0xBA]]


@pytest.mark.parametrize("seed", range(40))
def test_pack_unpack_round_trip(seed):
    g = gen(seed)
    n = int(torch.randint(0, 40, (1,), generator=g))
    k = 2 * int(torch.randint(0, 150, (1,), generator=g))
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = formats.pack_int4(codes)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8 and packed.is_contiguous()
    assert torch.equal(formats.unpack_int4(packed), codes)
    # and the other way: every byte is a valid pair of codes
    raw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    assert torch.equal(formats.pack_int4(formats.unpack_int4(raw)), raw)


def test_pack_int4_non_contiguous_codes():
    codes = torch.randint(0, 16, (64, 10), generator=gen(0), dtype=torch.uint8).t()
    assert torch.equal(formats.unpack_int4(formats.pack_int4(codes)), codes)


def test_pack_int4_rejects():
    with pytest.raises(ValueError, match=r"K even, got shape \(3, 5\)"):
        formats.pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got shape \(6,\)"):
        formats.pack_int4(torch.zeros(6, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"2-D uint8 tensor, got torch\.int8"):
        formats.unpack_int4(torch.zeros(3, 4, dtype=torch.int8))


# ------------------------------------------------------------------------- int8 per channel


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "kind,make",
    [("gaussian", gaussian_weight), ("outlier_channels", outlier_channel_weight),
     ("outlier_features", outlier_feature_weight), ("heavy_tailed", heavy_tailed_weight)],
)
def test_int8_sqnr_floor(kind, make, seed):
    w = make(256, 1024, seed)
    q, s = formats.quantize_int8_per_channel(w)
    got = sqnr_db(w, formats.dequantize_int8_per_channel(q, s))
    floor = SQNR_FLOORS_DB[f"int8/{kind}"]
    assert got >= floor, f"int8 {kind} seed {seed}: SQNR {got:.2f} dB < floor {floor} dB"


def test_int8_outlier_channels_leave_other_rows_alone():
    """Per-channel scales: rows x100 do not cost the ordinary rows any precision (a per-tensor
    scale would quantize them to ~0)."""
    w = outlier_channel_weight(256, 1024, seed=0, n_outliers=4, factor=100.0)
    normal = w.abs().amax(1) < 20
    assert int(normal.sum()) == 252
    q, s = formats.quantize_int8_per_channel(w)
    deq = formats.dequantize_int8_per_channel(q, s)
    got = sqnr_db(w[normal], deq[normal])
    assert got >= SQNR_FLOORS_DB["int8/gaussian"], got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_codes_and_error_bound(dtype):
    w = gaussian_weight(64, 300, seed=3).to(dtype)
    w[5, 7] = -w[5].abs().max() * 2  # the row's extreme is negative: code -127, never -128
    w[9] = -torch.arange(300, dtype=torch.float32).to(dtype)
    q, s = formats.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == (64, 300) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (64,)
    assert int(q.min()) == -127 and int(q.max()) <= 127
    assert q[5, 7] == -127 and q[9, -1] == -127
    wf = w.float()
    assert torch.equal(s, wf.abs().amax(1) / 127)
    err = (wf - formats.dequantize_int8_per_channel(q, s)).abs()
    assert (err <= s[:, None] / 2 * _HALF_STEP_SLACK).all(), "int8 error exceeds half a step"


def test_int8_zero_rows():
    w = gaussian_weight(6, 40)
    w[2] = 0
    w[4] = 0
    q, s = formats.quantize_int8_per_channel(w)
    assert s[2] == 1 and s[4] == 1
    assert not q[2].any() and not q[4].any()
    deq = formats.dequantize_int8_per_channel(q, s)
    assert torch.equal(deq[2], torch.zeros(40)) and torch.equal(deq[4], torch.zeros(40))


def test_int8_empty():
    q, s = formats.quantize_int8_per_channel(torch.zeros(3, 0))
    assert q.shape == (3, 0) and torch.equal(s, torch.ones(3))
    q, s = formats.quantize_int8_per_channel(torch.zeros(0, 5))
    assert q.shape == (0, 5) and s.shape == (0,)


def test_int8_rejects():
    with pytest.raises(TypeError, match=r"float tensor, got dtype torch\.int8"):
        formats.quantize_int8_per_channel(torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"2-D \[N, K\], got shape \(3, 4, 5\)"):
        formats.quantize_int8_per_channel(torch.zeros(3, 4, 5))
    with pytest.raises(TypeError, match=r"torch\.Tensor, got list"):
        formats.quantize_int8_per_channel([[1.0]])


# ----------------------------------------------------------------- int8 per-row activations


def test_quantize_rows_int8_format():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -127.0, 63.5],
                      [0.0] * 8,
                      [-254.0, 1.0, 3.0, -3.0, 5.0, 0.0, 2.0, 254.0]])
    q, s = formats.quantize_rows_int8(x)
    assert s.tolist() == [1.0, 1.0, 2.0]
    # round half to even: .5 -> 0, 1.5 -> 2, 2.5 -> 2, 63.5 -> 64
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -127, 64],
                          [0] * 8,
                          [-127, 0, 2, -2, 2, 0, 1, 127]]


def test_quantize_rows_int8_never_minus_128():
    x = gaussian_weight(50, 77, seed=4) * torch.logspace(-20, 20, 50)[:, None]
    q, s = formats.quantize_rows_int8(x)
    assert int(q.min()) == -127 or int(q.max()) == 127
    assert int(q.min()) >= -127


# ------------------------------------------------------------------------ int4 group-wise


@pytest.mark.parametrize("group", INT4_GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_int4_sqnr_floor(group, symmetric):
    floor = SQNR_FLOORS_DB[f"int4/g{group}/{'symmetric' if symmetric else 'asymmetric'}/gaussian"]
    for seed in SEEDS:
        w = gaussian_weight(256, 1024, seed)
        codes, scales, zeros = formats.quantize_int4_groupwise(w, group, symmetric)
        deq = formats.dequantize_int4_groupwise(formats.pack_int4(codes), scales, zeros, group)
        got = sqnr_db(w, deq)
        assert got >= floor, f"g{group} sym={symmetric} seed {seed}: {got:.2f} dB < {floor} dB"


def test_int4_asymmetric_beats_symmetric():
    w = gaussian_weight(256, 1024, 0)
    res = {}
    for sym in (False, True):
        c, s, z = formats.quantize_int4_groupwise(w, 128, sym)
        res[sym] = sqnr_db(w, formats.dequantize_int4_groupwise(formats.pack_int4(c), s, z, 128))
    assert res[False] > res[True] + 0.5, res


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_int4_codes_in_range(group, symmetric):
    w = heavy_tailed_weight(33, 4 * group, seed=group)
    codes, scales, zeros = formats.quantize_int4_groupwise(w, group, symmetric)
    assert codes.dtype == torch.uint8 and codes.shape == (33, 4 * group)
    assert scales.dtype == torch.float32 and scales.shape == (33, 4)
    assert zeros.dtype == torch.uint8 and zeros.shape == (33, 4)
    assert int(codes.max()) <= 15 and int(zeros.max()) <= 15
    assert (scales > 0).all()
    if symmetric:
        assert (zeros == 8).all()


def _int4_half_step_ok(w, group, symmetric):
    """Is every weight within half a step of its dequantized value, where the step is the one
    the group's own range calls for: max|w| / 7 symmetric; asymmetric (the integer zero point
    keeps 0 representable) (max(wmax, 0) - min(wmin, 0)) / 15."""
    n, k = w.shape
    codes, scales, zeros = formats.quantize_int4_groupwise(w, group, symmetric)
    deq = formats.dequantize_int4_groupwise(formats.pack_int4(codes), scales, zeros, group)
    g = w.reshape(n, k // group, group)
    if symmetric:
        step = g.abs().amax(2) / 7
    else:
        step = (g.amax(2).clamp(min=0) - g.amin(2).clamp(max=0)) / 15
    step = step.repeat_interleave(group, dim=1)
    err = (w - deq).abs()
    return err <= step / 2 * _HALF_STEP_SLACK, err, step


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_int4_error_at_most_half_a_step(symmetric):
    """Round to nearest inside the representable range: every weight within scale/2."""
    w = heavy_tailed_weight(64, 512, seed=5)
    ok, err, step = _int4_half_step_ok(w, 64, symmetric)
    assert ok.all(), f"max err/step {(err / step).max():.3f}"


@pytest.mark.parametrize("offset", [10.0, -10.0, 0.3], ids=["all_positive", "all_negative", "constant"])
def test_int4_asymmetric_groups_not_straddling_zero(offset):
    """A group whose weights all have one sign (a bias-like row, a shifted embedding) must still
    quantize to within half a step. The zero point is an integer in 0..15, so the quantized range
    [-zero*s, (15-zero)*s] always contains 0: it has to span [min(wmin, 0), max(wmax, 0)]."""
    g = gen(11)
    w = torch.rand(4, 64, generator=g) + offset if offset != 0.3 else torch.full((4, 64), 0.3)
    w[3, :32] = 0.0  # and one all-zero group: exact
    ok, err, step = _int4_half_step_ok(w, 32, symmetric=False)
    assert ok.all(), (
        f"asymmetric int4 of a group in [{w.min():.3g}, {w.max():.3g}]: max |err| {err.max():.3g} "
        f"vs half step {step.max() / 2:.3g}")


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_int4_zero_groups(symmetric):
    w = gaussian_weight(3, 128, seed=1)
    w[1, 32:64] = 0
    w[2] = 0
    codes, scales, zeros = formats.quantize_int4_groupwise(w, 32, symmetric)
    assert scales[1, 1] == 1 and (scales[2] == 1).all()
    assert torch.equal(codes[1, 32:64].long(), zeros[1, 1].long().expand(32))
    deq = formats.dequantize_int4_groupwise(formats.pack_int4(codes), scales, zeros, 32)
    assert torch.equal(deq[1, 32:64], torch.zeros(32)) and torch.equal(deq[2], torch.zeros(128))


def test_int4_rejects():
    w = gaussian_weight(4, 96)
    with pytest.raises(ValueError, match=r"K=96 is not a multiple of group_size=64"):
        formats.quantize_int4_groupwise(w, 64)
    for bad in (0, -32, 33):
        with pytest.raises(ValueError, match=rf"group_size={bad} must be a positive even number"):
            formats.quantize_int4_groupwise(w, bad)
    with pytest.raises(TypeError, match=r"float tensor"):
        formats.quantize_int4_groupwise(torch.zeros(4, 64, dtype=torch.int32), 32)
