"""Calibrated quantization end to end: configs (method + options, validation, round trips),
quantize_(..., calibration=...) on any module tree (blocks found and run in sequence, layers
outside them, plain Sequential fallback, Hugging Face BERT and Llama), clear errors for bad
calibration data with every hook removed, the accuracy report (returned, printed, JSON,
saved beside the checkpoint and validated), checkpoints with input_scale, the real MiniLM
targets, and peak memory while calibrating a 1.6 GB Llama-architecture model."""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyquant
from calib_models import layer_inputs, net, net_batches, tiny_llama, token_batches
from helpers import cosine
from pyquant import calibrate, models
from pyquant.calibrate import report as rep
from pyquant.calibrate import sequential
from pyquant.config import (AWQOptions, GPTQOptions, Int4Dynamic, Int4WeightOnly, Int8Dynamic,
                            Int8WeightOnly, SmoothQuantOptions, config_from_dict)

HAVE_TRANSFORMERS = models.minilm_missing_reason() is None or \
    "transformers" not in (models.minilm_missing_reason() or "")

CALIBRATED = [
    Int4WeightOnly(group_size=32, method="gptq"),
    Int4WeightOnly(group_size=32, method="gptq", options=GPTQOptions(act_order=True)),
    Int4WeightOnly(group_size=32, symmetric=True, method="awq"),
    Int8WeightOnly(method="gptq"),
    Int8WeightOnly(method="awq"),
    Int8Dynamic(method="smoothquant"),
    Int4Dynamic(group_size=32, method="gptq"),
    Int4Dynamic(group_size=32, method="awq"),
]
IDS = ["int4-gptq", "int4-gptq-actorder", "int4sym-awq", "int8-gptq", "int8-awq",
       "int8dyn-sq", "int4dyn-gptq", "int4dyn-awq"]


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config", CALIBRATED + [Int4WeightOnly(), Int8Dynamic()],
                         ids=IDS + ["int4-rtn", "int8dyn-rtn"])
def test_config_round_trips(config):
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON
    again = config_from_dict(d)
    assert again == config and hash(again) == hash(config)
    assert again.options == config.options


def test_config_options_normalized_and_validated():
    c = Int4WeightOnly(method="gptq")
    assert c.options == GPTQOptions() and c == Int4WeightOnly(method="gptq", options={})
    assert Int4WeightOnly(method="awq", options={"grid_size": 5}).options == AWQOptions(5)
    assert Int8Dynamic(method="smoothquant", options={"alpha": 0.8}).options.alpha == 0.8
    assert Int4WeightOnly().options is None
    bad = [
        (lambda: Int4WeightOnly(method="smoothquant"), ValueError, "method='smoothquant'"),
        (lambda: Int8Dynamic(method="gptq"), ValueError, "'rtn', 'smoothquant'"),
        (lambda: Int8WeightOnly(method="GPTQ"), ValueError, "not supported"),
        (lambda: Int4WeightOnly(method="rtn", options=GPTQOptions()), ValueError,
         "takes no options"),
        (lambda: Int4WeightOnly(method="gptq", options=AWQOptions()), TypeError, "GPTQOptions"),
        (lambda: Int4WeightOnly(method="gptq", options={"damp": 0.1}), ValueError,
         r"unknown GPTQOptions field\(s\) \['damp'\]"),
        (lambda: GPTQOptions(damp_percent=0), ValueError, "damp_percent=0"),
        (lambda: GPTQOptions(damp_percent=float("nan")), ValueError, "damp_percent"),
        (lambda: GPTQOptions(block_size=0), ValueError, "block_size=0"),
        (lambda: GPTQOptions(block_size=True), ValueError, "block_size"),
        (lambda: GPTQOptions(act_order=1), TypeError, "act_order"),
        (lambda: AWQOptions(grid_size=0), ValueError, "grid_size=0"),
        (lambda: AWQOptions(clip="yes"), TypeError, "clip"),
        (lambda: SmoothQuantOptions(alpha=1.5), ValueError, "alpha=1.5"),
        (lambda: SmoothQuantOptions(alpha="0.5"), ValueError, "alpha"),
    ]
    for make, exc, match in bad:
        with pytest.raises(exc, match=match):
            make()
    with pytest.raises(ValueError, match="unknown GPTQOptions"):
        config_from_dict({"scheme": "int4_weight_only", "group_size": 64, "symmetric": False,
                          "method": "gptq", "options": {"bogus": 1}})


# ------------------------------------------------------------------------------- errors


def test_calibrated_method_without_data_is_an_error():
    model = net()
    with pytest.raises(ValueError, match=r"method='gptq'\) needs calibration data"):
        pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="gptq"))
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("calibration, exc, match", [
    ([], ValueError, "calibration is empty"),
    (iter(()), ValueError, "calibration is empty"),
    (itertools.repeat(torch.randn(4, 64)), ValueError, r"more than 65536 batches and may never end"),
    (torch.randn(4, 64), TypeError, "wrap a single batch in a list"),
    ({"x": torch.randn(4, 64)}, TypeError, "wrap a single batch in a list"),
    (42, TypeError, "must be an iterable"),
    ([torch.randn(4, 64), "text"], TypeError, "calibration batch 1 is a str"),
    ([torch.randn(0, 64)], ValueError, "calibration batch 0 .* empty tensor"),
    ([{"x": 3}], ValueError, "holds no tensor"),
    ([torch.randn(4, 65)], ValueError,
     r"calibration batch 0 \(tensor float32 \[4, 65\]\) does not fit the model Net"),
    ([torch.randn(4, 64), torch.randn(4, 63)], ValueError, r"calibration batch 1 .*\[4, 63\]"),
    ([{"y": torch.randn(4, 64)}], ValueError, r"batch 0 \(dict\(y: .*unexpected keyword"),
])
def test_bad_calibration_data_is_a_clear_error(calibration, exc, match):
    model = net()
    before = copy.deepcopy(model.state_dict())
    model.train()
    with pytest.raises(exc, match=match):
        pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="gptq"),
                          calibration=calibration)
    assert _no_hooks(model)
    assert model.training  # mode restored
    # bad data is found before any layer changes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_activations_are_a_clear_error_and_hooks_are_removed():
    model = net()
    x = net_batches(2)
    x[1] = x[1].clone()
    x[1][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration inputs hold NaN or inf"):
        pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="gptq"), calibration=x)
    assert _no_hooks(model)


# ------------------------------------------------------------------------------- blocks


def test_find_blocks_is_generic():
    m = net()
    ids = {id(x) for x in m.modules() if isinstance(x, nn.Linear)}
    name, blocks = sequential.find_blocks(m, ids)
    assert name == "blocks" and blocks == list(m.blocks)
    seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    assert sequential.find_blocks(seq, {id(x) for x in seq.modules()}) == (None, [])
    # a ModuleList of bare Linear layers (parallel heads) is not a chain of blocks
    heads = nn.Module()
    heads.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
    assert sequential.find_blocks(heads, {id(x) for x in heads.modules()}) == (None, [])
    tiny = models.tiny_model()
    name, blocks = sequential.find_blocks(tiny, {id(x) for x in tiny.modules()})
    assert name == "blocks" and len(blocks) == 2


@pytest.mark.parametrize("config", CALIBRATED, ids=IDS)
def test_every_config_calibrates_a_model_with_blocks(config):
    torch.manual_seed(0)
    model = net()
    ref = copy.deepcopy(model)
    calib = net_batches(3, as_kwargs=True)  # keyword arguments (scale) reach the blocks too
    out = pyquant.quantize_(model, config, calibration=calib)
    names = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    assert out.swapped == names and not out.skipped
    assert all(isinstance(model.get_submodule(n), config.layer_cls) for n in names)
    assert _no_hooks(model)
    acc = out.accuracy
    assert acc is model.pyquant_accuracy and acc.method == config.method
    assert acc.calibration["blocks"] == "blocks" and acc.calibration["num_blocks"] == 3
    assert [x.name for x in acc.layers] == names
    for x in acc.layers:
        assert x.method == config.method and x.tokens == 192, x
        assert x.weight_sqnr_db > (12 if "4" in config.scheme else 25), x
        assert x.output_sqnr_db > (12 if "4" in config.scheme else 20), x
    uses_scale = config.method in ("awq", "smoothquant")
    for n in names:
        layer = model.get_submodule(n)
        assert (layer.input_scale is not None) == uses_scale
        assert layer.config == config
    x = net_batches(1, seed=7)[0]
    with torch.no_grad():
        assert cosine(model(x), ref(x)) > 0.99
    assert acc.model.cosine_mean > 0.99 and acc.model.vectors == 192


def test_blocks_see_the_outputs_of_the_quantized_blocks_before_them(monkeypatch):
    """The Hessian GPTQ gets for block 1 is that of the inputs the *quantized* block 0
    produces (sequential quantization), not of the float model's."""
    seen = {}
    real = sequential.factor_hessian

    def spy(box, options, what):
        seen[what] = box[0].clone()
        return real(box, options, what)

    monkeypatch.setattr(sequential, "factor_hessian", spy)
    model = net()
    float_model = copy.deepcopy(model)
    calib = net_batches(3)
    pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="gptq"), calibration=calib)

    def hessian(x):
        return 2 * x.T @ x / x.shape[0]

    def ln(m, x):  # block 1's first Linear is fed its LayerNorm's output
        return F.layer_norm(x, (x.shape[-1],), m.blocks[1].norm.weight, m.blocks[1].norm.bias)

    x_q = ln(model, layer_inputs(model, model.blocks[1].norm, calib))
    x_f = ln(float_model, layer_inputs(float_model, float_model.blocks[1].norm, calib))
    got = seen["blocks.1.up"]
    torch.testing.assert_close(got, hessian(x_q), rtol=1e-4, atol=1e-4 * got.abs().max().item())
    assert (got - hessian(x_f)).abs().max() > 100 * (got - hessian(x_q)).abs().max()


def test_plain_sequential_falls_back_to_one_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    ref = copy.deepcopy(model)
    calib = [torch.randn(32, 64) for _ in range(3)]
    out = pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="gptq"),
                            calibration=calib)
    assert out.swapped == ["0", "2"]
    assert out.accuracy.calibration["blocks"] is None
    assert [x.tokens for x in out.accuracy.layers] == [96, 96]
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert cosine(model(x), ref(x)) > 0.99
    assert _no_hooks(model)


def test_blocks_that_are_not_a_chain_fall_back():
    class Parallel(nn.Module):  # blocks applied to the same input, outputs summed
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32)) for _ in range(3))

        def forward(self, x):
            return sum(b(x) for b in self.blocks)

    torch.manual_seed(0)
    model = Parallel().eval()
    ref = copy.deepcopy(model)
    out = pyquant.quantize_(model, Int8WeightOnly(method="gptq"),
                            calibration=[torch.randn(16, 32)])
    cal = out.accuracy.calibration
    assert cal["blocks"] is None and "not block 0's output" in cal["fallback"]
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert cosine(model(x), ref(x)) > 0.999


def test_shared_unused_and_filtered_layers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = self.a  # the same Linear twice
            self.unused = nn.Linear(32, 32)
            self.c = nn.Linear(32, 16)

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    model = M().eval()
    out = pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="gptq"),
                            filter_fn=lambda m, fqn: fqn != "c",
                            calibration=[torch.randn(8, 32)])
    assert out.swapped == ["a", "b", "unused"] and out.skipped == [("c", "rejected by filter_fn")]
    assert model.a is model.b and isinstance(model.a, pyquant.Int4WeightOnlyLinear)
    assert type(model.c) is nn.Linear
    by_name = {x.name: x for x in out.accuracy.layers}
    assert set(by_name) == {"a", "unused"}
    assert by_name["a"].tokens == 16 and "shared: also b" in by_name["a"].note
    assert by_name["unused"].method == "rtn" and "no calibration token" in by_name["unused"].note


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_bfloat16_model(method):
    model = net().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    calib = [b.to(torch.bfloat16) for b in net_batches(2)]
    out = pyquant.quantize_(model, Int4WeightOnly(group_size=32, method=method),
                            calibration=calib)
    assert model.blocks[0].up.bias.dtype == torch.bfloat16
    x = net_batches(1, seed=4)[0].to(torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        assert y.dtype == torch.bfloat16 and cosine(y, ref(x)) > 0.98
    assert out.accuracy.model.cosine_mean > 0.98


def test_nothing_to_quantize():
    out = pyquant.quantize_(net(), Int4WeightOnly(group_size=32, method="gptq"),
                            filter_fn=lambda m, fqn: False, calibration=net_batches(1))
    assert out.swapped == [] and len(out.skipped) == 8 and out.accuracy.layers == []
    assert "model output: not measured" in str(out)


def test_rtn_with_calibration_matches_plain_rtn_and_reports():
    model = net()
    plain = copy.deepcopy(model)
    out = pyquant.quantize_(model, Int4WeightOnly(group_size=32), calibration=net_batches(2))
    pyquant.quantize_(plain, Int4WeightOnly(group_size=32))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert out.accuracy.method == "rtn" and len(out.accuracy.layers) == 8


# ------------------------------------------------------------------------------- Hugging Face


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "padded"])
def test_llama_gptq_blocks_cache_and_padding(mask):
    model = tiny_llama()
    model.config.use_cache = True
    ref = copy.deepcopy(model)
    calib = token_batches(512, mask=mask)
    out = pyquant.quantize_(model, Int4WeightOnly(group_size=64, method="gptq"),
                            calibration=calib)
    acc = out.accuracy
    assert acc.calibration["blocks"] == "model.layers" and acc.calibration["num_blocks"] == 2
    assert len(out.swapped) == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
    assert model.config.use_cache is True  # restored
    real_tokens = 2 * 2 * 32 - (2 * 16 if mask else 0)
    assert {x.tokens for x in acc.layers} == {real_tokens}  # padding left out
    assert acc.model.output == "logits" and acc.model.vectors == real_tokens
    assert acc.model.cosine_mean > 0.99
    # held out: random weights and tokens give GPTQ nothing to exploit and 128 tokens for
    # K=512 overfit; this checks that the model still works (RTN here: ~0.977)
    ids = token_batches(512, n_batches=1, seed=5)[0]
    with torch.no_grad():
        assert cosine(model(**ids).logits, ref(**ids).logits) > 0.93
    assert _no_hooks(model)


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
def test_bert_blocks_found():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, vocab_size=100)).eval()
    calib = [{"input_ids": torch.randint(0, 100, (2, 12)),
              "attention_mask": torch.ones(2, 12, dtype=torch.long)}]
    out = pyquant.quantize_(model, Int8Dynamic(method="smoothquant"), calibration=calib)
    assert out.accuracy.calibration["blocks"] == "encoder.layer"
    assert len(out.swapped) == 13 and out.accuracy.model.cosine_mean > 0.99


# ------------------------------------------------------------------------------- report


def test_report_table_json_and_validation():
    model = net()
    out = pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="awq"),
                            calibration=net_batches(2))
    acc = out.accuracy
    text = calibrate.format_table(acc)
    assert text == str(acc) and text in str(out)
    assert "blocks.2.down" in text and "model output (output)" in text
    lines = text.splitlines()
    assert len(lines) == 2 + len(acc.layers) + 1
    d = json.loads(acc.to_json())
    rep.validate(d)
    again = rep.AccuracyReport.from_dict(d)
    assert again.to_dict() == d and format_equal(calibrate.format_table(d), text)
    short = calibrate.format_table(acc, max_layers=2)
    assert "6 better layer(s) not shown" in short
    for broken, match in [
        ({**d, "format": "x"}, "not a pyquant accuracy report"),
        ({**d, "layers": "x"}, "'layers' must be a list"),
        ({**d, "layers": [{**d["layers"][0], "tokens": "5"}]}, r"layers\[0\].tokens"),
        ({**d, "layers": [{**d["layers"][0], "extra": 1}]}, r"layers\[0\] must have fields"),
        ({**d, "layers": [{**d["layers"][0], "out_features": 0}]}, "impossible sizes"),
        ({**d, "model": {**d["model"], "cosine_min": 2.0}}, "model cosines"),
    ]:
        with pytest.raises(ValueError, match=match):
            rep.validate(broken)


def format_equal(a: str, b: str) -> bool:
    return a.splitlines()[1:] == b.splitlines()[1:]


def test_exact_layers_report_infinite_sqnr_as_null():
    model = nn.Sequential(nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    out = pyquant.quantize_(model, Int8WeightOnly(method="gptq"),
                            calibration=[torch.randn(4, 32)])
    x = out.accuracy.layers[0]
    assert x.weight_sqnr_db == math.inf
    d = json.loads(out.accuracy.to_json())
    assert d["layers"][0]["weight_sqnr_db"] is None
    assert rep.AccuracyReport.from_dict(d).layers[0].weight_sqnr_db == math.inf
    assert " inf " in calibrate.format_table(d)


def test_a_report_with_nan_saves_the_checkpoint_and_warns(tmp_path):
    """An fp16 model whose outputs overflow on the calibration data: the report's model-level
    metrics are NaN (its min cosine too: it used to read 1.0 beside a NaN mean), and
    pyquant.save used to raise after writing the checkpoint. Now the checkpoint is saved and a
    warning says why its report is not."""
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.b(self.a(x) * 1000)

    torch.manual_seed(0)
    model = Big().half().eval()
    r = pyquant.quantize_(model, pyquant.Int8WeightOnly(),
                          calibration=[torch.randn(8, 64).half() * 50])
    assert math.isnan(r.accuracy.model.cosine_mean) and math.isnan(r.accuracy.model.cosine_min)
    path = tmp_path / "m.safetensors"
    with pytest.warns(RuntimeWarning, match=r"checkpoint is saved, but its accuracy report is "
                                            r"not: it holds NaN"):
        pyquant.save(model, path)
    assert path.exists() and not (tmp_path / "m.safetensors.report.json").exists()


def test_save_writes_the_report_beside_the_checkpoint(tmp_path):
    model = net()
    skeleton = copy.deepcopy(model)
    out = pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="awq"),
                            calibration=net_batches(2))
    path = tmp_path / "m.safetensors"
    pyquant.save(model, path)
    side = tmp_path / "m.safetensors.report.json"
    assert side.exists()
    on_disk = json.loads(side.read_text())
    assert on_disk["checkpoint"] == "m.safetensors"
    loaded = calibrate.load_report(path)
    assert loaded.to_dict() == out.accuracy.to_dict()
    assert calibrate.load_report(side).to_dict() == loaded.to_dict()
    # the checkpoint itself loads into a float skeleton, input_scale included
    pyquant.load(skeleton, path)
    assert skeleton.pyquant_accuracy.to_dict() == out.accuracy.to_dict()  # back on the model
    x = net_batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))
    assert torch.equal(skeleton.blocks[0].up.input_scale, model.blocks[0].up.input_scale)
    assert skeleton.blocks[0].up.config == model.blocks[0].up.config
    # an explicit report= wins; a model without one removes the stale file
    other = tmp_path / "o.safetensors"
    plain = net()
    pyquant.quantize_(plain, Int4WeightOnly(group_size=32))
    pyquant.save(plain, other, report=out)
    assert calibrate.load_report(other).method == "awq"
    pyquant.save(plain, other)
    assert not (tmp_path / "o.safetensors.report.json").exists()
    with pytest.raises(ValueError, match="has no accuracy report"):
        pyquant.save(plain, other, report=pyquant.quantize_(net(), Int8WeightOnly()))
    side.write_text('{"format": "pyquant-accuracy", "version": 1}')
    with pytest.raises(ValueError, match="'scheme' must be a str"):
        calibrate.load_report(path)
    side.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        calibrate.load_report(path)
    with pytest.warns(RuntimeWarning, match="ignoring the accuracy report beside it"):
        m = pyquant.load(net(), path)  # the checkpoint itself is fine
    assert not hasattr(m, "pyquant_accuracy")


@pytest.mark.parametrize("value, match", [
    (float("nan"), "1 NaN"), (float("inf"), "1 inf"), (0.0, "1 finite <= 0"),
    (-1.0, "1 finite <= 0"),
])
def test_load_rejects_bad_input_scale(tmp_path, value, match):
    model = net()
    skeleton = copy.deepcopy(model)
    pyquant.quantize_(model, Int8Dynamic(method="smoothquant"), calibration=net_batches(1))
    model.blocks[1].down.input_scale[5] = value
    path = tmp_path / "bad.safetensors"
    pyquant.save(model, path)
    with pytest.raises(ValueError, match=rf"layer 'blocks.1.down': input_scale has .*{match}"):
        pyquant.load(skeleton, path)


def test_input_scale_shape_mismatch_is_caught_on_load(tmp_path):
    model = net()
    pyquant.quantize_(model, Int4WeightOnly(group_size=32, method="awq"),
                      calibration=net_batches(1))
    model.blocks[0].up.input_scale = torch.ones(7)
    path = tmp_path / "bad.safetensors"
    pyquant.save(model, path)
    with pytest.raises(ValueError, match=r"'blocks.0.up.input_scale' is torch.float32 \[7\], "
                                         r"expected torch.float32 \[128\]"):
        pyquant.load(net(), path)


# ------------------------------------------------------------------------------- real model

MINILM_TARGETS = {  # method: (config, floor of the mean cosine to fp32 on eval sentences)
    "gptq": (Int4WeightOnly(group_size=64, method="gptq"), 0.98),
    "awq": (Int4WeightOnly(group_size=64, method="awq"), 0.98),
    "smoothquant": (Int8Dynamic(method="smoothquant"), 0.999),
}
# round-to-nearest of the same formats, the baselines the calibrated methods must beat
MINILM_RTN = {"gptq": Int4WeightOnly(group_size=64), "awq": Int4WeightOnly(group_size=64),
              "smoothquant": Int8Dynamic()}


def _by_length(tok, sents: list, batch_size: int) -> list:
    """Tokenized batches of sentences of similar length: the same sentences (embeddings do not
    depend on the batching), a fraction of the padding, so calibration runs ~2x faster."""
    order = sorted(sents, key=lambda t: len(tok(t)["input_ids"]))
    return models.tokenize(tok, order, batch_size=batch_size)


@pytest.fixture(scope="module")
def minilm():
    if models.minilm_missing_reason():
        pytest.skip(f"all-MiniLM-L6-v2: {models.minilm_missing_reason()}")
    model, tok = models.load_minilm()
    calib = _by_length(tok, models.sentences("calib"), 32)
    evals = _by_length(tok, models.sentences("eval"), 64)
    return model, calib, evals, models.encode_batches(model, evals), {}


def _mean_cos(model, evals, ref) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pyquant:", category=RuntimeWarning)
        emb = models.encode_batches(model, evals)
    return float(F.cosine_similarity(emb, ref, dim=1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(MINILM_TARGETS))
def test_minilm_calibrated_targets(minilm, method):
    model, calib, evals, ref, rtn_cache = minilm
    config, floor = MINILM_TARGETS[method]
    assert ref.shape[0] >= 100 and sum(len(b["input_ids"]) for b in calib) == 128
    rtn_config = MINILM_RTN[method]
    if rtn_config not in rtn_cache:
        base = copy.deepcopy(model)
        pyquant.quantize_(base, rtn_config)
        rtn_cache[rtn_config] = _mean_cos(base, evals, ref)
    rtn_cos = rtn_cache[rtn_config]
    q = copy.deepcopy(model)
    out = pyquant.quantize_(q, config, calibration=calib)
    cos = _mean_cos(q, evals, ref)
    acc = out.accuracy
    print(f"\nMiniLM {method}: mean cosine to fp32 on {ref.shape[0]} eval sentences {cos:.5f} "
          f"(rtn {rtn_cos:.5f}, floor {floor}); on the calibration data "
          f"{acc.model.cosine_mean:.5f}; {acc.calibration['seconds']:.1f} s")
    assert acc.calibration["blocks"] == "encoder.layer" and len(acc.layers) == 37
    assert cos > rtn_cos
    assert cos >= floor, f"{method}: mean cosine {cos:.5f} < {floor} (rtn {rtn_cos:.5f})"


# ------------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import torch
    warnings.filterwarnings("ignore")

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key)

    import pyquant
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    hidden, inter, layers, vocab = 2048, int(sys.argv[1]), 8, 1024
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
                      max_position_embeddings=256)
    g = torch.Generator().manual_seed(1)
    # few tokens: the memory measured is the model's, the stats' and one block's (forwards
    # cost time, not memory); H of rank 64 exercises the damping too
    batches = [{"input_ids": torch.randint(0, vocab, (2, 32), generator=g)}]
    base = status("VmRSS")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    out = pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=128, method="gptq"),
                            calibration=batches)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "size": size,
                      "swapped": len(out.swapped), "cos": out.accuracy.model.cosine_mean,
                      "seconds": out.accuracy.calibration["seconds"]}))
""")
LLAMA_INTERMEDIATE = 5632


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_llama_calibration_peak_memory():
    """GPTQ on a LlamaForCausalLM (hidden 2048, 8 layers, random weights, fp32: 1.6 GB) peaks
    below 1.5x the model's size over the RSS before the model existed (a fresh process: the
    high-water mark is this run's)."""
    env = {**os.environ, "PYQUANT_QUIET": "1"}
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(LLAMA_INTERMEDIATE)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = (m["peak"] - m["base"]) / m["size"]
    print(f"\nLlama 2048x8 (intermediate {LLAMA_INTERMEDIATE}) GPTQ: model "
          f"{m['size'] / 2**30:.2f} GiB, peak over baseline {(m['peak'] - m['base']) / 2**30:.2f}"
          f" GiB = {ratio:.2f}x; {m['seconds']:.0f} s; cosine {m['cos']:.4f}")
    assert m["swapped"] == 8 * 7 + 1
    assert ratio < 1.5, f"peak {ratio:.2f}x the model size"


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
def test_positional_attention_mask_leaves_padding_out():
    """A batch given as a tuple (input_ids, attention_mask) has its padding left out of the
    statistics as the dict form does: the mask is found in the position the model's forward
    takes it."""
    calib = token_batches(512, mask=True)
    as_tuples = [(b["input_ids"], b["attention_mask"]) for b in calib]
    reports = []
    for data in (calib, as_tuples):
        model = tiny_llama()
        reports.append(pyquant.quantize_(model, Int4WeightOnly(group_size=64, method="gptq"),
                                         calibration=data).accuracy)
    real_tokens = 2 * 2 * 32 - 2 * 16
    for acc in reports:
        assert {x.tokens for x in acc.layers} == {real_tokens}
        assert acc.model.vectors == real_tokens
    assert [x.output_sqnr_db for x in reports[0].layers] == \
        [x.output_sqnr_db for x in reports[1].layers]


class _ReadsInnerWeight(nn.Module):
    """Reads a grandchild Linear's .weight in its own forward: a use no check can see."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(64, 64))
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        x = x.to(self.inner[0].weight.dtype)
        return self.out(torch.relu(self.inner(x)))


@pytest.mark.parametrize("prune", [False, True], ids=["quantize", "sparsify"])
def test_failure_after_swap_names_the_swap_not_the_batch(prune):
    model = _ReadsInnerWeight()
    calib = [torch.randn(4, 64) for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"ran through the float model.*swapped \d layer.*"
                                           r"filter_fn.*reload it"):
        if prune:
            pyquant.sparsify_(model, pyquant.Sparse24(method="wanda"), calibration=calib)
        else:
            pyquant.quantize_(model, Int8WeightOnly(method="gptq"), calibration=calib)
    # a batch that does not fit the float model is still named as such
    with pytest.raises(ValueError, match="calibration batch 0 .* does not fit the model"):
        pyquant.quantize_(_ReadsInnerWeight(), Int8WeightOnly(method="gptq"),
                          calibration=[torch.randn(4, 63)])


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
def test_positional_mask_through_torch_compile_wrapper():
    """torch.compile's wrapper takes forward(*args, **kwargs); the mask position is the
    wrapped model's (no compilation happens here)."""
    from pyquant.calibrate.sequential import _mask_position

    model = tiny_llama()
    assert _mask_position(model) == 1
    assert _mask_position(torch.compile(model)) == 1
