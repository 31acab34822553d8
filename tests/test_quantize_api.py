"""pyquant.quantize_ and the quantized layers end to end: which layers get swapped (any module
tree, Hugging Face models included), what is skipped and why, quality against float (cosine
floors), state_dict round trips, repr, torch.compile, inference_mode, config validation."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import pyquant
from helpers import COSINE_FLOORS, assert_close_named, cosine
from pyquant.nn import QUANT_LAYERS

CONFIGS = [
    pytest.param(pyquant.Int8WeightOnly(), id="int8_weight_only"),
    pytest.param(pyquant.Int8Dynamic(), id="int8_dynamic"),
    pytest.param(pyquant.Int4WeightOnly(group_size=64), id="int4_g64"),
    pytest.param(pyquant.Int4WeightOnly(group_size=32, symmetric=True), id="int4_g32_sym"),
]


def _floor(config) -> float:
    return COSINE_FLOORS["int4" if isinstance(config, pyquant.Int4WeightOnly) else "int8"]


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64, bias=False), nn.GELU(), nn.Linear(64, 32)
    ).to(dtype).eval()


def _float_linears(model):
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def _x(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------- swapping


@pytest.mark.parametrize("config", CONFIGS)
def test_sequential(config):
    model = _mlp()
    ref_model = copy.deepcopy(model)
    x = _x(4, 7, 64)
    report = pyquant.quantize_(model, config)
    assert report.swapped == ["0", "2", "4"] and report.skipped == []
    assert _float_linears(model) == []
    for name in report.swapped:
        layer, orig = model.get_submodule(name), ref_model.get_submodule(name)
        assert isinstance(layer, config.layer_cls)
        assert (layer.in_features, layer.out_features) == (orig.in_features, orig.out_features)
        if orig.bias is None:
            assert layer.bias is None
        else:  # the bias is kept exactly, dtype included
            assert torch.equal(layer.bias, orig.bias.detach())
    assert 0 < report.bytes_after < report.bytes_before
    with torch.no_grad():
        got, want = model(x), ref_model(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert cosine(got, want) > _floor(config)


def test_bf16_model():
    model = _mlp(dtype=torch.bfloat16)
    ref_model = copy.deepcopy(model)
    pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=32))
    assert model[0].bias.dtype == torch.bfloat16
    x = _x(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.bfloat16
    assert cosine(got, ref_model(x)) > COSINE_FLOORS["int4"]


CAST_CONFIGS = [*CONFIGS, pytest.param(pyquant.Int4Dynamic(group_size=32), id="int4_dynamic"),
                pytest.param(pyquant.Sparse24Int8WeightOnly(), id="sparse24_int8"),
                pytest.param(pyquant.Sparse24Int4WeightOnly(group_size=32), id="sparse24_int4")]
SCALE_BUFFERS = ("weight_scale", "weight_scales", "input_scale")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast", ["method", "to"])
@pytest.mark.parametrize("config", CAST_CONFIGS)
def test_half_and_bfloat16_casts_after_quantizing(config, cast, dtype):
    """model.bfloat16() / .half() / .to(dtype) after quantize_: the scales stay float32 and
    unrounded (the ops require float32 and would refuse the next forward), the bias follows
    the cast, and the model runs in the new dtype."""
    model = _mlp()
    if isinstance(config, (pyquant.Sparse24Int8WeightOnly, pyquant.Sparse24Int4WeightOnly)):
        pyquant.sparsify_(model, config)
    else:
        pyquant.quantize_(model, config)
    model[0].input_scale = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    scales = {n: b.clone() for n, b in model.named_buffers() if n.endswith(SCALE_BUFFERS)}
    assert len(scales) == 4  # three layers' weight scales and one input scale
    x = _x(5, 64).to(dtype)
    with torch.no_grad():
        want = model(x.float())
    if cast == "method":
        getattr(model, {torch.bfloat16: "bfloat16", torch.float16: "half"}[dtype])()
    else:
        model.to("cpu", dtype)
    for name, b in model.named_buffers():
        if name in scales:
            assert b.dtype == torch.float32 and torch.equal(b, scales[name]), name
        elif name.endswith("bias"):
            assert b.dtype == dtype, name
    with torch.no_grad():
        got = model(x)
    assert got.dtype == dtype
    # the layers' inputs are rounded to dtype on the way (and requantized where dynamic)
    assert cosine(got.float(), want) > 0.999


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(64, 64), "o": nn.Linear(64, 64, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        x = x + self.attn["o"](torch.tanh(self.attn["q"](x)))
        return x + self.mlp(self.norm(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("config", CONFIGS)
def test_nested_modules(config):
    torch.manual_seed(1)
    model = _Net().eval()
    ref_model = copy.deepcopy(model)
    expected = _float_linears(model)
    report = pyquant.quantize_(model, config)
    assert sorted(report.swapped) == sorted(expected) and len(expected) == 9
    assert _float_linears(model) == []
    assert isinstance(model.blocks[1].attn["o"], config.layer_cls)
    x = _x(2, 5, 64)
    with torch.no_grad():
        assert cosine(model(x), ref_model(x)) > _floor(config)


def test_shared_linear_is_swapped_everywhere():
    """One nn.Linear reachable under two names (weight tying by module reuse): every place that
    holds it must end up quantized, not just the first name named_modules() reports."""
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    pyquant.quantize_(model, pyquant.Int8WeightOnly())
    assert _float_linears(model) == [], f"still float: {_float_linears(model)}"
    assert model[0] is model[2], "the shared layer should stay shared after the swap"


@pytest.mark.parametrize("fn", ["quantize_", "sparsify_"])
def test_layers_that_must_stay_float_are_skipped_with_the_reason(fn):
    """nn.MultiheadAttention reads out_proj.weight itself, and a Linear whose weight is tied
    to an embedding would become a second (quantized) copy: both stay as they are, with the
    reason in the report, and the model still runs; a layer already swapped is reported as
    such instead of silently passed over."""
    config = pyquant.Int8WeightOnly() if fn == "quantize_" else pyquant.Sparse24()
    run = getattr(pyquant, fn)
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(64, 4, batch_first=True)
    model.embed = nn.Embedding(100, 64)
    model.head = nn.Linear(64, 100, bias=False)
    model.head.weight = model.embed.weight
    model.proj = nn.Linear(64, 64)
    report = run(model, config)
    skipped = dict(report.skipped)
    assert report.swapped == ["proj"]
    assert "MultiheadAttention" in skipped["attn.out_proj"]
    assert "tied to embed (Embedding)" in skipped["head"]
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert model.head.weight is model.embed.weight
    x = torch.randn(2, 5, 64)
    model.attn(x, x, x)
    again = run(model, config)
    assert again.swapped == [] and "already a pyquant layer" in dict(again.skipped)["proj"]


@pytest.mark.parametrize("config", [pyquant.Int8WeightOnly(), pyquant.Int4WeightOnly(group_size=32),
                                    pyquant.Int8Dynamic(), pyquant.Sparse24()],
                         ids=["int8_weight_only", "int4", "int8_dynamic", "sparse24"])
def test_gpt2_conv1d_layers(config, tmp_path):
    """GPT-2's projections are transformers' Conv1D (weight [in, out]): each becomes the
    nn.Linear it computes and is swapped like one; the lm_head tied to the token embedding
    stays float (with the reason); the model generates, and a checkpoint loads into a fresh
    GPT-2 skeleton (whose layers are still Conv1D) with the same output."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300,
                                  n_positions=64, bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    model = copy.deepcopy(base)
    run = pyquant.sparsify_ if isinstance(config, pyquant.SparseConfig) else pyquant.quantize_
    report = run(model, config)
    per_block = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert sorted(report.swapped) == sorted(f"transformer.h.{i}.{n}" for i in range(2)
                                            for n in per_block)
    assert "tied to transformer.wte" in dict(report.skipped)["lm_head"]
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, y0 = model(ids).logits, base(ids).logits
    if not isinstance(config, pyquant.SparseConfig):  # pruning half the weights moves more
        assert cosine(y, y0) > (0.99 if isinstance(config, pyquant.Int4WeightOnly) else 0.999)
    assert model.generate(ids[:1, :3], max_new_tokens=3, do_sample=False).shape == (1, 6)
    path = tmp_path / "gpt2.safetensors"
    pyquant.save(model, path)
    loaded = pyquant.load(transformers.GPT2LMHeadModel(cfg).eval(), path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, y)


def test_layers_whose_parent_reads_their_weight_stay_float():
    """T5's feed forward reads wo.weight (its dtype) and Mamba's head casts to
    lm_head.weight.dtype: a quantized layer has no float weight there, so those layers stay
    float with the reason, and the models run; Llama's and BERT's layers are all swapped."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)).eval()
    base = copy.deepcopy(t5)
    report = pyquant.quantize_(t5, pyquant.Int4WeightOnly(group_size=32))
    skipped = dict(report.skipped)
    assert "tied to shared" in skipped.pop("lm_head")  # T5 ties its head to the embedding
    assert len(skipped) == 4 and all(f.endswith("DenseReluDense.wo") for f in skipped)
    assert all("reads wo.weight itself" in why for why in skipped.values())
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = t5(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        assert cosine(y, base(input_ids=ids, decoder_input_ids=ids[:, :4]).logits) > 0.95
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, tie_word_embeddings=False)).eval()
    report = pyquant.quantize_(mamba, pyquant.Int8WeightOnly())
    assert "reads lm_head.weight itself" in dict(report.skipped)["lm_head"]
    with torch.no_grad():
        assert mamba(ids).logits.shape == (2, 7, 128)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128))
    assert pyquant.quantize_(llama, pyquant.Int8WeightOnly()).skipped == []


def test_arguments_in_each_others_place_are_named():
    """quantize_(model, config, filter_fn, calibration) and sparsify_(model, config,
    calibration, filter_fn): data where a filter belongs, or a filter where data belongs, is
    a TypeError that says which argument it is, not a silent no-op."""
    with pytest.raises(TypeError, match="filter_fn must be a callable.*calibration="):
        pyquant.quantize_(_mlp(), pyquant.Int8WeightOnly(), [_x(2, 64)])
    with pytest.raises(TypeError, match="calibration must be an iterable.*filter_fn="):
        pyquant.sparsify_(_mlp(), pyquant.Sparse24(), lambda m, fqn: False)


def test_filter_fn():
    model = _mlp()
    seen = []

    def keep(module, fqn):
        seen.append((type(module), fqn))
        return fqn != "2"

    report = pyquant.quantize_(model, pyquant.Int8WeightOnly(), filter_fn=keep)
    assert seen == [(nn.Linear, "0"), (nn.Linear, "2"), (nn.Linear, "4")]
    assert report.swapped == ["0", "4"]
    assert report.skipped == [("2", "rejected by filter_fn")]
    assert type(model[2]) is nn.Linear and isinstance(model[0], pyquant.Int8WeightOnlyLinear)


def test_int4_skips_k_not_multiple_of_group():
    model = nn.Sequential(nn.Linear(100, 64), nn.Linear(64, 48), nn.Linear(48, 8))
    report = pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=64))
    assert report.swapped == ["1"]
    reasons = dict(report.skipped)
    assert set(reasons) == {"0", "2"}
    assert "K=100" in reasons["0"] and "group_size=64" in reasons["0"]
    assert "K=48" in reasons["2"] and "group_size=64" in reasons["2"]
    # no supported group size divides 100 or 48: the hint is to pad
    assert "pad K to a multiple of 32" in reasons["0"] and "pad K" in reasons["2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert "skipped 0: K=100" in str(report)


def test_report_str_and_repr():
    report = pyquant.quantize_(_mlp(), pyquant.Int8Dynamic())
    assert "swapped 3 linear layer(s), skipped 0" in str(report)
    assert "swapped=3" in repr(report)


# -------------------------------------------------------------------- Hugging Face models


def _hf_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64)).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)).eval()
    return {"bert": bert, "llama": llama}


@pytest.fixture(scope="module")
def hf_models():
    return _hf_models()


def _hf_out(name, model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.last_hidden_state if name == "bert" else out.logits


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("config", CONFIGS)
def test_hf_model(hf_models, name, config):
    model = copy.deepcopy(hf_models[name])
    expected = _float_linears(model)
    assert len(expected) == (13 if name == "bert" else 15)
    report = pyquant.quantize_(model, config)
    assert sorted(report.swapped) == sorted(expected) and report.skipped == []
    assert _float_linears(model) == []
    got, want = _hf_out(name, model, IDS), _hf_out(name, hf_models[name], IDS)
    assert cosine(got, want) > _floor(config)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hf_model_int4_group_too_big(hf_models, name):
    """hidden=64 is no multiple of group_size=128: those layers are skipped, with the reason;
    the K=128 ones (the MLP down projections) are swapped."""
    model = copy.deepcopy(hf_models[name])
    report = pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=128))
    k_of = {n: m.in_features for n, m in hf_models[name].named_modules() if isinstance(m, nn.Linear)}
    assert sorted(report.swapped) == sorted(n for n, k in k_of.items() if k == 128)
    assert len(report.swapped) == 2
    for fqn, why in report.skipped:
        assert k_of[fqn] == 64
        assert "K=64" in why and "group_size=128" in why and "group_size=64 would work" in why
    assert cosine(_hf_out(name, model, IDS), _hf_out(name, hf_models[name], IDS)) > 0.99


def test_hf_state_dict_round_trip(hf_models):
    config = pyquant.Int4WeightOnly(group_size=32)
    model = copy.deepcopy(hf_models["llama"])
    pyquant.quantize_(model, config)
    fresh = _hf_models()["llama"]  # other random weights
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    pyquant.quantize_(fresh, config)
    assert not torch.equal(_hf_out("llama", fresh, IDS), _hf_out("llama", model, IDS))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_hf_out("llama", fresh, IDS), _hf_out("llama", model, IDS))


# ------------------------------------------------------------- state_dict, repr, runtime


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_round_trip(config):
    model = _mlp(seed=0)
    pyquant.quantize_(model, config)
    sd = model.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in sd.values())
    fresh = _mlp(seed=123)
    pyquant.quantize_(fresh, config)
    x = _x(3, 64)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        missing_unexpected = fresh.load_state_dict(sd, strict=True)
        assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("config,scheme", [
    (pyquant.Int8WeightOnly(), "int8_weight_only"),
    (pyquant.Int8Dynamic(), "int8_dynamic"),
    (pyquant.Int4WeightOnly(group_size=64), "int4_weight_only, group_size=64, asymmetric"),
    (pyquant.Int4WeightOnly(group_size=32, symmetric=True), "int4_weight_only, group_size=32, symmetric"),
])
def test_repr(config, scheme):
    model = _mlp()
    pyquant.quantize_(model, config)
    r = repr(model[0])
    assert r.startswith(config.layer_cls.__name__)
    assert "in_features=64" in r and "out_features=128" in r and "bias=True" in r
    assert scheme in r, r
    assert "bias=False" in repr(model[2])
    assert model[0].config == config


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(config, backend):
    model = _mlp()
    pyquant.quantize_(model, config)
    x = _x(2, 5, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        want = model(x)
        got = compiled(x)
        got_m1 = compiled(x[:1, :1])  # another shape: recompiles (or dynamic), still exact
    assert torch.equal(got, want)
    assert torch.equal(got_m1, model(x[:1, :1]))


def test_compile_inductor():
    """Inductor once (the slowest compile on a 2-core machine): the op stays one opaque node."""
    model = _mlp()
    pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=64))
    x = _x(5, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert_close_named(got, want, "compile_vs_eager/float32")


@pytest.mark.parametrize("config", CONFIGS)
def test_inference_mode(config):
    model = _mlp()
    pyquant.quantize_(model, config)
    x = _x(3, 64)
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        got = model(x)
    assert got.is_inference()
    assert torch.equal(got, want)


def test_layer_buffers_not_parameters():
    model = _mlp()
    pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=64))
    assert list(model[0].parameters()) == []
    names = {n for n, _ in model[0].named_buffers()}
    assert names == {"bias", "weight_packed", "weight_scales", "weight_zeros"}


# ------------------------------------------------------------------------- validation


def test_int4_config_validation():
    with pytest.raises(ValueError, match=r"group_size=48 is not supported; use one of \(32, 64, 128, 256\)"):
        pyquant.Int4WeightOnly(group_size=48)
    for bad in (0, -64, 512):
        with pytest.raises(ValueError, match=rf"group_size={bad} is not supported"):
            pyquant.Int4WeightOnly(group_size=bad)
    with pytest.raises(TypeError, match=r"group_size must be an int, got bool True"):
        pyquant.Int4WeightOnly(group_size=True)
    with pytest.raises(TypeError, match=r"group_size must be an int, got float 64\.0"):
        pyquant.Int4WeightOnly(group_size=64.0)
    with pytest.raises(TypeError, match=r"symmetric must be True or False, got 'yes'"):
        pyquant.Int4WeightOnly(symmetric="yes")
    cfg = pyquant.Int4WeightOnly(group_size=256, symmetric=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.group_size = 32  # type: ignore[misc]


@pytest.mark.parametrize("bad", ["int8", pyquant.Int8WeightOnly, None, {"scheme": "int8_weight_only"}],
                         ids=["str", "class-not-instance", "None", "dict"])
def test_quantize_rejects_non_config(bad):
    with pytest.raises(TypeError, match=r"config must be a pyquant config"):
        pyquant.quantize_(_mlp(), bad)


def test_config_class_instead_of_instance_says_how_to_call_it():
    for fn, cls in ((pyquant.quantize_, pyquant.Int8WeightOnly), (pyquant.sparsify_, pyquant.Sparse24)):
        with pytest.raises(TypeError, match=rf"the class {cls.__name__} itself; pass an "
                                            rf"instance: pyquant\.{cls.__name__}\(\)"):
            fn(_mlp(), cls)


def test_lazy_and_meta_layers_are_skipped_with_the_reason():
    """An nn.LazyLinear has no weight before its first forward; sparsify_ needs values that a
    meta-device weight does not have (quantize_ builds meta layers: pyquant.load skeletons)."""
    lazy = nn.Sequential(nn.LazyLinear(8))
    assert "run one forward" in dict(pyquant.quantize_(lazy, pyquant.Int8WeightOnly()).skipped)["0"]
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    assert "meta device" in dict(pyquant.sparsify_(meta, pyquant.Sparse24()).skipped)["0"]
    assert pyquant.quantize_(meta, pyquant.Int8WeightOnly()).swapped == ["0"]
    # calibration runs the float model: a meta one is a clear error, before any change
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"1 layer\(s\) hold weights on the meta device"):
        pyquant.quantize_(meta, pyquant.Int8WeightOnly(method="gptq"),
                          calibration=[torch.randn(2, 8)])
    assert isinstance(meta[0], nn.Linear)


def test_float64_layers_are_skipped_with_the_reason():
    """The ops take float32/bf16/fp16 activations: a float64 layer stays float64 and says why
    (it used to be swapped, then fail at its first forward)."""
    for fn, config in ((pyquant.quantize_, pyquant.Int8WeightOnly()),
                       (pyquant.sparsify_, pyquant.Sparse24())):
        model = _mlp().double()
        report = fn(model, config)
        assert report.swapped == [] and all("float64" in why for _, why in report.skipped)
        model(_x(2, 64).double())


def test_quantize_rejects_non_module():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got dict"):
        pyquant.quantize_({"a": nn.Linear(4, 4)}, pyquant.Int8WeightOnly())


def test_quantize_rejects_bare_linear():
    lin = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"cannot replace the model object itself.*Int8WeightOnlyLinear\.from_float"):
        pyquant.quantize_(lin, pyquant.Int8WeightOnly())
    assert type(lin) is nn.Linear


def test_layer_classes_cover_every_scheme():
    assert {c.config_cls.scheme for c in QUANT_LAYERS} == {
        "int8_weight_only", "int8_dynamic", "int4_weight_only", "int4_dynamic",
        # the sparse layers (pyquant.sparse_nn) share the tables so that save/load see them
        "sparse24", "unstructured", "sparse24_int8_weight_only", "sparse24_int4_weight_only"}


def test_what_a_layer_cannot_hold_is_skipped_with_the_reason():
    """NaN or Inf weights (the scale would be NaN and pyquant.load refuses the checkpoint), an
    int8 K past the exact int32 sums; a config for another layer class is a TypeError."""
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[3, 7] = float("nan")
        lin.weight[0, 0] = float("inf")
    for fn, config in ((pyquant.quantize_, pyquant.Int8WeightOnly()),
                       (pyquant.quantize_, pyquant.Int4WeightOnly(group_size=32)),
                       (pyquant.sparsify_, pyquant.Sparse24())):
        model = nn.Sequential(lin)
        why = dict(fn(model, config).skipped)["0"]
        assert "1 NaN and 1 Inf value(s)" in why, why
        assert model[0] is lin
    with torch.device("meta"):
        wide = nn.Sequential(nn.Linear(pyquant._checks.INT8_MAX_K + 1, 2))
    for config in (pyquant.Int8WeightOnly(), pyquant.Int8Dynamic()):
        assert "the largest K whose int8 products" in dict(
            pyquant.quantize_(wide, config).skipped)["0"]
    with pytest.raises(TypeError, match=r"Int4WeightOnlyLinear\.from_float got Int8WeightOnly, "
                                        r"a config for Int8WeightOnlyLinear"):
        pyquant.nn.Int4WeightOnlyLinear.from_float(nn.Linear(64, 8), pyquant.Int8WeightOnly())
    with pytest.raises(TypeError, match=r"takes a pyquant\.Sparse24\(\.\.\.\) config, got dict"):
        pyquant.sparse_nn.Sparse24Linear.from_float(nn.Linear(64, 8), {"sparsity": 0.5})


@pytest.mark.parametrize("how", ["quantize_", "quantize_ gptq", "sparsify_"])
def test_float_layers_are_freed_as_they_are_swapped(how, monkeypatch):
    """Each float layer is freed once its quantized one is in place: quantize_ (both paths) and
    sparsify_ without data used to hold every float layer until they returned, through the
    owners map and the list of targets."""
    import gc
    import weakref

    from pyquant import models

    model = models.tiny_model()
    refs = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, nn.Linear)]
    config = {"quantize_": pyquant.Int8WeightOnly(),
              "quantize_ gptq": pyquant.Int8WeightOnly(method="gptq"),
              "sparsify_": pyquant.Sparse24()}[how]
    alive = []

    def count(*_):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))

    cls = config.layer_cls
    from_float = cls.from_float.__func__

    def counting(c, *args, **kwargs):
        count()
        return from_float(c, *args, **kwargs)

    monkeypatch.setattr(cls, "from_float", classmethod(counting))
    # GPTQ builds its layers otherwise: count when the last block runs on the calibration data
    # (the first block's layers are swapped by then)
    hook = model.blocks[-1].register_forward_pre_hook(count)
    if how == "sparsify_":
        pyquant.sparsify_(model, config)
    elif how == "quantize_":
        pyquant.quantize_(model, config)
    else:
        pyquant.quantize_(model, config, calibration=models.tiny_inputs(2, seed=1))
    hook.remove()
    first, last = len(refs), len(refs) // len(model.blocks)  # the last block's own layers
    assert alive[0] == first and min(alive) <= last, alive
