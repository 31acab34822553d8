"""AWQ and SmoothQuant (pyquant/calibrate/awq.py, smoothquant.py): on layers whose inputs have
a few outlier channels (the LLM case), both recover most of what round-to-nearest loses; the
per-channel scale is folded exactly (weights times s, activations times input_scale = 1/s) and
every backend runs the resulting layers."""
from __future__ import annotations

import copy

import pytest
import torch

import pyquant
from calib_models import net, net_batches, outlier_acts
from helpers import assert_close_named, backend_isa_params, on_backend
from pyquant import formats, reference
from pyquant.calibrate import QuantSpec, awq_quantize, rtn, smoothquant_quantize
from pyquant.calibrate.smoothquant import smooth_scales
from pyquant.config import AWQOptions, SmoothQuantOptions

N, K = 256, 512


def _w(seed=5):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def _err(w, deq, x):
    return float((x @ (w - deq).T).pow(2).sum())


def _dyn_err(w, qw, x):
    """Output error of W8A8 (per-token int8 activations, the reference kernel)."""
    xs = x if qw.input_scale is None else x * qw.input_scale
    return float((reference.int8_dynamic_mm(xs, qw.codes, qw.scales) - x @ w.T).pow(2).sum())


# ------------------------------------------------------------------------------- AWQ


@pytest.mark.parametrize("spec, limit", [
    (QuantSpec("int4", 128, False), 0.35),  # measured 0.22
    (QuantSpec("int4", 64, True), 0.30),  # measured 0.18
    (QuantSpec("int8"), 0.5),  # measured 0.39 (no clip search for int8)
], ids=["int4-g128", "int4-g64-sym", "int8"])
def test_awq_recovers_most_of_the_loss_on_outlier_channels(spec, limit):
    w = _w()
    x, cols = outlier_acts(2048, K, n_out=4, factor=30.0)
    x_eval, _ = outlier_acts(2048, K, seed=9, n_out=4, factor=30.0)
    a = awq_quantize(w, x, x.abs().mean(0), spec)
    ratio = _err(w, a.dequantize(), x_eval) / _err(w, rtn(w, spec).dequantize(), x_eval)
    print(f"\nAWQ {spec}: held-out output error {ratio:.3f}x RTN's "
          f"(recovers {100 * (1 - ratio):.0f}% of the loss)")
    assert ratio < limit
    s = a.input_scale
    assert s.dtype == torch.float32 and s.shape == (K,)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    # the outlier channels' weights were scaled up, so their activations are scaled down
    assert float(s[cols].max()) < float(s.median())


def test_awq_without_clip_is_never_worse_than_rtn_on_its_data():
    """alpha = 0 (s = 1, plain RTN) is one of the candidates."""
    spec = QuantSpec("int4", 64, False)
    for seed in range(3):
        w = _w(seed)
        x = torch.randn(512, K, generator=torch.Generator().manual_seed(seed))
        a = awq_quantize(w, x, x.abs().mean(0), spec, AWQOptions(grid_size=8, clip=False))
        assert _err(w, a.dequantize(), x) <= _err(w, rtn(w, spec).dequantize(), x) * (1 + 1e-6)


def test_awq_grid_of_one_is_rtn():
    w = _w()
    x, _ = outlier_acts(256, K)
    spec = QuantSpec("int4", 128, False)
    a = awq_quantize(w, x, x.abs().mean(0), spec, AWQOptions(grid_size=1, clip=False))
    r = rtn(w, spec)
    assert torch.equal(a.codes, r.codes) and torch.equal(a.scales, r.scales)
    assert torch.equal(a.input_scale, torch.ones(K))


def test_awq_bad_inputs():
    w = _w()
    with pytest.raises(ValueError, match=r"AWQ on blocks.0.up: calibration inputs of shape "
                                         r"\(4, 3\) do not match weight shape \(256, 512\)"):
        awq_quantize(w, torch.randn(4, 3), torch.ones(3), QuantSpec("int8"), what="blocks.0.up")
    x = torch.randn(8, K)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        awq_quantize(w, x, x.abs().mean(0), QuantSpec("int8"))


def _channel_off_in_calibration(seed=11):
    """Calibration inputs with channel 3 at 0 on every token, and held-out ones where it is as
    active as the others."""
    x, _ = outlier_acts(512, K, seed=seed)
    x_eval, _ = outlier_acts(512, K, seed=seed + 1)
    x[:, 3] = 0
    return x, x_eval


def test_awq_keeps_the_weights_of_a_channel_calibration_never_reached():
    """Such a channel used to get the smallest s (its mean |x| is 0): its weights shrank to no
    code in their group and the layer lost them (held-out error up to 0.99 relative where
    round-to-nearest gave 0.004); it takes the median s of the others now."""
    w = _w()
    x, x_eval = _channel_off_in_calibration()
    spec = QuantSpec("int4", 128, False)
    qw = awq_quantize(w, x, x.abs().mean(0), spec)
    plain = rtn(w, spec)
    assert float(qw.input_scale[3]) == pytest.approx(float(qw.input_scale.median()), rel=0.3)
    assert _err(w, qw.dequantize(), x_eval) < 2.0 * _err(w, plain.dequantize(), x_eval)


# ------------------------------------------------------------------------------- SmoothQuant


def test_smoothquant_scales_are_the_paper_formula():
    w = torch.tensor([[1.0, -4.0, 0.5], [2.0, 1.0, -0.25]])
    act_max = torch.tensor([8.0, 1.0, 100.0])
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smooth_scales(w, act_max, alpha)
        expect = act_max.pow(alpha) / torch.tensor([2.0, 4.0, 0.5]).pow(1 - alpha)
        torch.testing.assert_close(s, expect)


@pytest.mark.parametrize("alpha, limit", [(0.5, 0.15), (0.8, 0.4)])  # measured 0.076, 0.28
def test_smoothquant_recovers_most_of_the_loss_on_outlier_channels(alpha, limit):
    w = _w()
    x, cols = outlier_acts(2048, K, n_out=4, factor=30.0)
    x_eval, _ = outlier_acts(2048, K, seed=9, n_out=4, factor=30.0)
    q, s = formats.quantize_int8_per_channel(w)
    plain = pyquant.calibrate.QuantizedWeight(QuantSpec("int8"), q, s)
    sq = smoothquant_quantize(w, x.abs().amax(0), QuantSpec("int8"), SmoothQuantOptions(alpha))
    ratio = _dyn_err(w, sq, x_eval) / _dyn_err(w, plain, x_eval)
    print(f"\nSmoothQuant alpha={alpha}: held-out W8A8 output error {ratio:.3f}x per-token "
          f"int8's (recovers {100 * (1 - ratio):.0f}% of the loss)")
    assert ratio < limit
    assert float(sq.input_scale[cols].max()) < float(sq.input_scale.median())


def test_smoothquant_dead_channels_get_a_bounded_scale():
    w = _w()
    x, _ = outlier_acts(256, K)
    x[:, 3] = 0  # never active in calibration
    sq = smoothquant_quantize(w, x.abs().amax(0), QuantSpec("int8"))
    amax = x.abs().amax(0)
    # a small value there at run time must not set the token's scale on its own
    assert float(sq.input_scale[3]) * 1e-3 * float(amax.max()) < float(
        (amax * sq.input_scale).max())
    with pytest.raises(ValueError, match=r"statistics of shape \(3,\) do not match"):
        smoothquant_quantize(w, torch.ones(3), QuantSpec("int8"))


def test_smoothquant_a_channel_calibration_never_reached_stays_typical():
    """It takes the median s: a value there at run time neither sets the token's int8 scale
    alone nor meets a weight column shrunk to nothing (held-out W8A8 error was 0.15-0.99
    relative before, against 0.007 for plain per-token int8)."""
    w = _w()
    x, x_eval = _channel_off_in_calibration()
    sq = smoothquant_quantize(w, x.abs().amax(0), QuantSpec("int8"))
    q, s = formats.quantize_int8_per_channel(w)
    plain = pyquant.calibrate.QuantizedWeight(QuantSpec("int8"), q, s)
    assert float(sq.input_scale[3]) == pytest.approx(float(sq.input_scale.median()), rel=1e-6)
    assert _dyn_err(w, sq, x_eval) < 2.0 * _dyn_err(w, plain, x_eval)


# ------------------------------------------------------------------------------- in models


def _outlier_net():
    """Net whose block LayerNorms amplify 4 channels 30x: the inputs of every ``up`` layer have
    outlier channels, as in LLMs."""
    model = net()
    with torch.no_grad():
        for b in model.blocks:
            b.norm.weight[[3, 40, 77, 100]] *= 30.0
    return model


@pytest.mark.parametrize("scheme", ["int4", "int8dyn"])
def test_outlier_model_recovers_most_of_the_loss(scheme):
    calib, held = net_batches(4, rows=128), net_batches(2, rows=128, seed=3)
    if scheme == "int4":
        plain, calibrated = (pyquant.Int4WeightOnly(group_size=32),
                             pyquant.Int4WeightOnly(group_size=32, method="awq"))
    else:
        plain, calibrated = pyquant.Int8Dynamic(), pyquant.Int8Dynamic(method="smoothquant")
    ref = _outlier_net()
    errs, accs = {}, {}
    for name, config in (("rtn", plain), ("calibrated", calibrated)):
        m = copy.deepcopy(ref)
        accs[name] = pyquant.quantize_(m, config, calibration=calib).accuracy
        with torch.no_grad():
            errs[name] = sum(float((m(x) - ref(x)).pow(2).sum()) for x in held)
    up_gain = [c.output_sqnr_db - r.output_sqnr_db
               for r, c in zip(accs["rtn"].layers, accs["calibrated"].layers)
               if c.name.endswith(".up")]
    ratio = errs["calibrated"] / errs["rtn"]
    print(f"\n{calibrated.method} on the outlier model: held-out output error {ratio:.3f}x "
          f"RTN's; 'up' layers (outlier inputs) gain "
          f"{', '.join(f'{g:+.1f}' for g in up_gain)} dB")
    assert ratio < 0.5  # measured: awq 0.40, smoothquant 0.30
    assert min(up_gain) > 3.0  # measured: awq +6.4..+8.5, smoothquant +9.4..+10.5


@pytest.fixture(scope="module")
def scaled_layers():
    out = {}
    for config in (pyquant.Int4WeightOnly(group_size=32, method="awq"),
                   pyquant.Int8WeightOnly(method="awq"), pyquant.Int8Dynamic(method="smoothquant")):
        model = _outlier_net()
        pyquant.quantize_(model, config, calibration=net_batches(2))
        out[config.scheme] = model.blocks[1].up
    return out


@pytest.mark.parametrize("backend, isa", backend_isa_params())
@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_weight_only", "int8_dynamic"])
def test_input_scale_layers_on_every_backend(scaled_layers, scheme, backend, isa):
    """A layer with input_scale computes op(x * input_scale) on every backend."""
    layer = scaled_layers[scheme]
    assert layer.input_scale is not None and layer.input_scale.shape == (layer.in_features,)
    x = torch.randn(6, layer.in_features) * 3
    op = {"int4_weight_only": "int4_weight_only_mm", "int8_weight_only": "int8_weight_only_mm",
          "int8_dynamic": "int8_dynamic_mm"}[scheme]
    sd = layer.state_dict()  # the canonical tensors, whatever layout the layer keeps them in
    args = ((sd["weight_packed"], sd["weight_scales"], sd["weight_zeros"], layer.group_size)
            if scheme.startswith("int4") else (sd["weight"], sd["weight_scale"]))
    expected = getattr(reference, op)(x * layer.input_scale, *args, layer.bias)
    with on_backend(backend, isa):
        got = layer(x)
    assert_close_named(got, expected, f"{op}/float32")
    # bf16 activations: x * input_scale is computed in float32 and rounded once
    xb = x.to(torch.bfloat16)
    with on_backend(backend, isa):
        gotb = layer(xb)
    expb = getattr(reference, op)((xb.float() * layer.input_scale).to(torch.bfloat16), *args,
                                  layer.bias)
    assert_close_named(gotb, expb, f"{op}/bfloat16")
