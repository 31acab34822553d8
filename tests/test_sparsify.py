"""pyquant.sparsify_ end to end: configs, the swap, sparse + quantized layers through quantize_,
checkpoints in compressed form (validated on load), and the accuracy ordering of the methods on
the real all-MiniLM-L6-v2 (magnitude < Wanda < SparseGPT at 50% unstructured and at 2:4)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pyquant
from helpers import sqnr_db
from pyquant import models
from pyquant.config import config_from_dict
from pyquant.sparse_formats import nm_mask_ok, unstructured_kept

pytestmark = pytest.mark.filterwarnings("ignore:pyquant.*reference backend:RuntimeWarning")

CONFIGS = [
    pyquant.Sparse24(),
    pyquant.Sparse24(method="sparsegpt", options={"block_size": 64}),
    pyquant.Unstructured(0.3, method="wanda", value_dtype="bfloat16"),
    pyquant.Sparse24Int8WeightOnly(method="wanda"),
    pyquant.Sparse24Int4WeightOnly(group_size=32, symmetric=True, method="sparsegpt"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_config_roundtrip(cfg):
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and type(again) is type(cfg)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: pyquant.Sparse24(method="obs"), ValueError, r"method='obs' is not a pruning method"),
    (lambda: pyquant.Unstructured(1.0), ValueError, r"sparsity=1.0 must be a number in \(0, 1\)"),
    (lambda: pyquant.Unstructured(True), ValueError, r"sparsity=True"),
    (lambda: pyquant.Sparse24(options={"block_size": 4}), ValueError, r"takes no options"),
    (lambda: pyquant.Sparse24(method="sparsegpt", options={"damp": 1}), ValueError,
     r"unknown SparseGPTOptions field\(s\) \['damp'\]"),
    (lambda: pyquant.SparseGPTOptions(damp_percent=0), ValueError, r"damp_percent=0"),
    (lambda: pyquant.Sparse24(value_dtype="int8"), ValueError, r"value_dtype='int8'"),
    (lambda: pyquant.Sparse24Int4WeightOnly(group_size=48), ValueError, r"group_size=48"),
])
def test_config_validation(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _dense_twin(model, sparse):
    """A float copy of ``model`` whose Linear weights are the sparse layers' dense weights."""
    twin = copy.deepcopy(model)
    for name, lin in _linears(twin):
        lin.weight.data.copy_(sparse.get_submodule(name).dense_weight())
    return twin


@pytest.mark.parametrize("cfg", [pyquant.Sparse24(), pyquant.Unstructured(0.7)], ids=repr)
def test_sparsify_magnitude_tiny(cfg):
    model = models.tiny_model()
    names = [n for n, _ in _linears(model)]
    ref_model = copy.deepcopy(model)
    report = pyquant.sparsify_(model, cfg)
    assert sorted(report.swapped) == sorted(names) and not report.skipped
    assert report.bytes_after < report.bytes_before
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, cfg.layer_cls)
        w = layer.dense_weight()
        orig = ref_model.get_submodule(name).weight
        keep = w != 0
        if isinstance(cfg, pyquant.Sparse24):
            assert nm_mask_ok(keep, 2, 4)
        else:
            assert bool((keep.sum(1) == unstructured_kept(w.shape[1], 0.7)).all())
        assert torch.equal(w[keep], orig[keep])  # magnitude: kept weights unchanged
    batch = models.tiny_inputs(4, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), _dense_twin(ref_model, model)(**batch),
                                   rtol=1e-5, atol=1e-5)
    assert "sparsified" in str(report)


def test_errors():
    model = models.tiny_model()
    with pytest.raises(ValueError, match=r"method='wanda'\) needs calibration data"):
        pyquant.sparsify_(model, pyquant.Sparse24(method="wanda"))
    with pytest.raises(TypeError, match=r"sparsity config such as pyquant.Sparse24"):
        pyquant.sparsify_(model, pyquant.Int8WeightOnly())
    with pytest.raises(TypeError, match=r"use pyquant.sparsify_"):
        pyquant.quantize_(model, pyquant.Sparse24())
    report = pyquant.sparsify_(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4)),
                               pyquant.Sparse24())
    assert report.skipped == [("0", "K=6 is not a multiple of 4 (2:4 keeps 2 of every 4 "
                                    "consecutive weights)")]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_tiny(method):
    model = models.tiny_model()
    cal = models.tiny_inputs(8, batch_size=4, seed=1)
    report = pyquant.sparsify_(model, pyquant.Sparse24(method=method), calibration=cal)
    assert report.calibration["blocks"] == "blocks" and report.calibration["num_blocks"] == 2
    assert len(report.swapped) == 12
    for _, m in model.named_modules():
        if isinstance(m, pyquant.Sparse24Linear):
            assert nm_mask_ok(m.dense_weight() != 0, 2, 4) or bool(
                ((m.dense_weight() != 0).reshape(m.out_features, -1, 4).sum(-1) <= 2).all())


def test_sparse_then_quantize():
    model = models.tiny_model()
    pyquant.sparsify_(model, pyquant.Sparse24())
    sparse = copy.deepcopy(model)
    r8 = pyquant.quantize_(copy.deepcopy(model), pyquant.Int8Dynamic())
    assert len(r8.swapped) == 0 and len(r8.skipped) == 12
    assert "cannot be quantized with Int8Dynamic" in r8.skipped[0][1]
    m8, m4 = copy.deepcopy(model), copy.deepcopy(model)
    rep8 = pyquant.quantize_(m8, pyquant.Int8WeightOnly())
    rep4 = pyquant.quantize_(m4, pyquant.Int4WeightOnly(group_size=32))
    assert len(rep8.swapped) == 12 and len(rep4.swapped) == 12
    for name, layer in sparse.named_modules():
        if not isinstance(layer, pyquant.Sparse24Linear):
            continue
        w = layer.dense_weight()
        for qm, cls, floor in ((m8, pyquant.Sparse24Int8Linear, 38.0),
                               (m4, pyquant.Sparse24Int4Linear, 17.0)):
            q = qm.get_submodule(name)
            assert isinstance(q, cls)
            wq = q.dense_weight()
            assert torch.equal(wq != 0, (w != 0) & (wq != 0))  # zeros stay zeros
            assert sqnr_db(w[w != 0], wq[w != 0]) > floor
    assert rep4.bytes_after < rep8.bytes_after < rep8.bytes_before
    batch = models.tiny_inputs(4, seed=3)[0]
    with torch.no_grad():
        ref = sparse(**batch)
        assert sqnr_db(ref, m8(**batch)) > 30 and sqnr_db(ref, m4(**batch)) > 12


def test_calibrated_quantize_of_an_all_sparse_model_is_refused():
    """Sparse layers take rounding to nearest only: with method='gptq' and every layer sparse,
    quantize_ used to return with each layer skipped and an empty calibrated report."""
    model = models.tiny_model()
    pyquant.sparsify_(model, pyquant.Sparse24())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"are all sparse.*take only method='rtn'"):
        pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=32, method="gptq"),
                          calibration=models.tiny_inputs(2, seed=1))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_calibration_inputs_that_are_always_zero_are_noted():
    """An input that is 0 on every calibration token: SparseGPT keeps its weights competing by
    magnitude (it used to zero them all, and a layer whose inputs were all 0 became zeros),
    Wanda prunes them first, and the report's note says how many there were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    batches = [torch.randn(6, 32) for _ in range(2)]
    for b in batches:
        b[:, :8] = 0  # the first layer's inputs 0-7 are never exercised
    for method, says in (("sparsegpt", "compete by magnitude"), ("wanda", "pruned first")):
        m = copy.deepcopy(model)
        r = pyquant.sparsify_(m, pyquant.Sparse24(method=method), calibration=batches)
        note = r.accuracy.layers[0].note
        assert note.startswith("8 of 32 inputs 0 on every calibration token") and says in note
        if method == "sparsegpt":  # in their own groups of 4, the larger two of each survive
            w = model[0].weight.detach()[:, :8]
            kept = m[0].dense_weight()[:, :8] != 0
            assert torch.equal(kept, pyquant.prune.magnitude_mask(w, None, (2, 4)))
    zero = [torch.zeros(6, 32)]
    m = copy.deepcopy(model)
    pyquant.sparsify_(m, pyquant.Sparse24(method="sparsegpt"), calibration=zero)
    assert int((m[0].dense_weight() != 0).sum()) == 16 * 32 // 2


CKPT_CONFIGS = [pyquant.Sparse24(value_dtype="float16"), pyquant.Unstructured(0.3),
                pyquant.Sparse24Int8WeightOnly(), pyquant.Sparse24Int4WeightOnly(group_size=64)]


@pytest.mark.parametrize("cfg", CKPT_CONFIGS, ids=repr)
def test_save_load_roundtrip(tmp_path, cfg):
    model = models.tiny_model()
    pyquant.sparsify_(model, cfg)
    path = tmp_path / "m.safetensors"
    pyquant.save(model, path)
    fresh = pyquant.load(models.tiny_model(seed=5), path)
    sd, sd2 = model.state_dict(), fresh.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    batch = models.tiny_inputs(4, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(model(**batch), fresh(**batch))
    # a meta-device skeleton works too (io builds the layers' empty() prototypes)
    with torch.device("meta"):
        skel = models.TinyEncoder()
    loaded = pyquant.load(skel, path)
    with torch.no_grad():
        assert torch.equal(model(**batch), loaded.eval()(**batch))


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
@pytest.mark.parametrize("cfg", [pyquant.Sparse24(), pyquant.Unstructured(0.5)], ids=repr)
def test_a_cast_float_sparse_model_saves_what_it_holds(tmp_path, cfg, cast):
    """model.bfloat16() casts the float kept values (they follow a cast, as a bias does); the
    checkpoint then records their new dtype, so that it loads into a skeleton cast alike."""
    model = models.tiny_model()
    pyquant.sparsify_(model, cfg)
    getattr(model, cast)()
    layer = next(m for m in model.modules() if hasattr(m, "weight_values"))
    dtype = layer.weight_values.dtype
    assert dtype == getattr(torch, {"half": "float16"}.get(cast, cast))
    assert layer.config.value_dtype == str(dtype)[6:]
    path = tmp_path / "m.safetensors"
    pyquant.save(model, path)
    fresh = pyquant.load(getattr(models.tiny_model(seed=5), cast)(), path)
    batch = models.tiny_inputs(4, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(model(**batch), fresh(**batch))


@pytest.mark.parametrize("cfg,buf,corrupt,match", [
    (pyquant.Sparse24(), "weight_meta", lambda t: t.__setitem__((0, 0), 0), "not distinct"),
    (pyquant.Unstructured(0.5), "weight_row_offsets", lambda t: t.__setitem__(3, t[3] + 1),
     "bit\\(s\\) set in the bitmask but row_offsets"),
    (pyquant.Unstructured(0.5), "weight_bitmask", lambda t: t.__setitem__((2, 0), t[2, 0] ^ 1),
     "row_offsets give"),
    (pyquant.Sparse24Int8WeightOnly(), "weight_values", lambda t: t.__setitem__((1, 1), -128),
     "-128"),
])
def test_load_rejects_bad_indices(tmp_path, cfg, buf, corrupt, match):
    model = models.tiny_model()
    pyquant.sparsify_(model, cfg)
    corrupt(getattr(model.blocks[0].up, buf))
    path = tmp_path / "bad.safetensors"
    pyquant.save(model, path)
    with pytest.raises(ValueError, match=match):
        pyquant.load(models.tiny_model(), path)


def test_bf16_model():
    model = models.tiny_model().to(torch.bfloat16)
    pyquant.sparsify_(model, pyquant.Unstructured(0.5))
    layer = model.blocks[0].up
    assert layer.weight_values.dtype == torch.bfloat16
    assert layer.config.value_dtype == "bfloat16"
    batch = models.tiny_inputs(2, seed=3)[0]
    with torch.no_grad():
        assert model(**batch).dtype == torch.bfloat16


# ------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(models.minilm_missing_reason() is not None,
                    reason=f"{models.minilm_missing_reason()}")
def test_minilm_method_ordering():
    """Calibrated on the 128 calib sentences, scored on 100 eval sentences (disjoint).
    (With only 32 calib sentences SparseGPT's Hessians of the 1536-wide FFN inputs are
    rank-deficient and its lead over Wanda at 50% shrinks to ~0.01.)"""
    from pyquant.prune import accuracy_table, format_accuracy_table

    rows = accuracy_table(n_eval=100, batch_size=64)
    print("\n" + format_accuracy_table(rows))
    cos = {(r["pattern"], r["method"]): r["mean_cosine"] for r in rows}
    for pattern in ("50%", "2:4"):
        mag, wanda, sgpt = (cos[(pattern, m)] for m in ("magnitude", "wanda", "sparsegpt"))
        assert wanda > mag + 0.05, rows
        assert sgpt > mag + 0.05, rows
        assert sgpt > wanda + 0.01, rows
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in rows)


def test_magnitude_with_calibration_data_says_what_it_used_it_for():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    report = pyquant.sparsify_(model, pyquant.Sparse24(), calibration=[torch.randn(2, 64)])
    assert report.swapped == ["0"]
    assert any("only measured the accuracy" in note for _, note in report.notes)
    assert "only measured the accuracy" in str(report)
    assert report.accuracy.layers[0].method == "magnitude"
    assert report.accuracy.layers[0].tokens == 2


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_calibrated_accuracy_report(method, tmp_path):
    """With calibration data, sparsify_ reports what quantize_ reports: each layer's weight and
    output SQNR on the calibration tokens, and the model output's cosine to the float model's.
    Checked against the same numbers computed here from the pruned and the float model."""
    from pyquant.calibrate.report import load_report, sqnr_db as report_sqnr

    model = models.tiny_model()
    ref = copy.deepcopy(model)
    cal = models.tiny_inputs(8, batch_size=4, seed=1)
    report = pyquant.sparsify_(model, pyquant.Sparse24(method=method), calibration=cal)
    acc = report.accuracy
    assert acc is model.pyquant_accuracy and acc.method == method
    assert acc.scheme == "sparse24" and acc.calibration["num_blocks"] == 2
    assert [x.name for x in acc.layers] == report.swapped
    real = sum(int(b["attention_mask"].sum()) for b in cal)
    assert {x.tokens for x in acc.layers} == {real}
    assert acc.model.vectors == real and acc.model.batches == len(cal)
    # layer 0's query sees the embeddings, the same in both models
    layer, float_layer = model.blocks[0].query, ref.blocks[0].query
    rows = []
    h = layer.register_forward_hook(lambda mod, args, out: rows.append(args[0]))
    sig = noise = 0.0
    cos = []
    with torch.no_grad():
        for b in cal:
            y, y_ref = model(**b), ref(**b)
            keep = b["attention_mask"].bool()
            x = rows.pop()[keep]
            r, q = float_layer(x), layer(x)
            sig += float(r.double().pow(2).sum())
            noise += float((r - q).double().pow(2).sum())
            cos.append(torch.nn.functional.cosine_similarity(y[keep].double(),
                                                             y_ref[keep].double(), dim=1))
    h.remove()
    got = acc.layers[report.swapped.index("blocks.0.query")]
    assert got.output_sqnr_db == pytest.approx(report_sqnr(sig, noise), abs=0.01)
    w = float_layer.weight.detach().double()
    assert got.weight_sqnr_db == pytest.approx(report_sqnr(
        float(w.pow(2).sum()), float((w - layer.dense_weight().double()).pow(2).sum())), abs=0.01)
    assert 3 < got.weight_sqnr_db < 20  # half of the weights are gone: a few dB, not inf
    cos = torch.cat(cos)
    assert acc.model.cosine_mean == pytest.approx(float(cos.mean()), abs=1e-5)
    assert acc.model.cosine_min == pytest.approx(float(cos.min()), abs=1e-5)
    assert "output dB" in str(report)
    # pyquant.save writes it beside the checkpoint, pyquant.load puts it back
    path = str(tmp_path / "m.safetensors")
    pyquant.save(model, path)
    assert load_report(path + ".report.json").to_dict() == acc.to_dict()
    fresh = pyquant.load(models.tiny_model(seed=5), path)
    assert fresh.pyquant_accuracy.to_dict() == acc.to_dict()


class _Boxed:
    def __init__(self, t):
        self.t = t


class _NoTensorOutput(torch.nn.Module):
    """No repeated blocks, and a forward whose output holds no tensor a runner can find."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return _Boxed(self.b(torch.relu(self.a(x))))


def test_accuracy_report_when_the_output_holds_no_tensor():
    """The layers still get their output error (one more pass over the model), the model line
    is left out."""
    model = _NoTensorOutput()
    report = pyquant.sparsify_(model, pyquant.Sparse24(method="wanda"),
                               calibration=[torch.randn(4, 64), torch.randn(3, 64)])
    acc = report.accuracy
    assert [(x.name, x.tokens) for x in acc.layers] == [("a", 7), ("b", 7)]
    assert all(x.output_sqnr_db is not None and x.output_sqnr_db > 0 for x in acc.layers)
    assert acc.model is None


def test_later_swaps_drop_or_keep_the_accuracy_report(tmp_path):
    """The report on the model describes its layers: a quantize_ that changes them without a
    report of its own drops it (no stale PATH.report.json); one that swaps nothing keeps it."""
    import os

    cal = models.tiny_inputs(8, batch_size=4, seed=1)
    model = models.tiny_model()
    pyquant.sparsify_(model, pyquant.Sparse24(method="wanda"), calibration=cal)
    wanda = model.pyquant_accuracy.to_dict()
    # calibrated GPTQ cannot quantize sparse layers: refused, the model and report stay
    with pytest.raises(ValueError, match="are all sparse"):
        pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=64, method="gptq"),
                          calibration=cal)
    assert model.pyquant_accuracy.to_dict() == wanda
    path = str(tmp_path / "a.safetensors")
    pyquant.save(model, path)
    assert json_scheme(path + ".report.json") == "sparse24"
    # rounding to int8 changes every layer: the pruning report no longer describes them
    out = pyquant.quantize_(model, pyquant.Int8WeightOnly())
    assert len(out.swapped) == 12 and getattr(model, "pyquant_accuracy", None) is None
    pyquant.save(model, path)
    assert not os.path.exists(path + ".report.json")
    # the same for sparsify_ without calibration after a calibrated quantize_
    model = models.tiny_model()
    pyquant.quantize_(model, pyquant.Int8WeightOnly(method="gptq"), calibration=cal,
                      filter_fn=lambda m, fqn: fqn.endswith("query"))
    assert model.pyquant_accuracy is not None
    pyquant.sparsify_(model, pyquant.Sparse24())
    assert getattr(model, "pyquant_accuracy", None) is None


def json_scheme(path):
    import json

    with open(path) as f:
        return json.load(f)["scheme"]
