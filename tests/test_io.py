"""pyquant.save / pyquant.load: exact round trips, safetensors compatibility, and a ValueError
(never a crash, never another exception) for every damaged or mismatched checkpoint."""
from __future__ import annotations

import json
import os
import pathlib
import random

import numpy as np
import pytest
import torch
from torch import nn

import pyquant
from pyquant.config import config_from_dict

CONFIGS = [
    pyquant.Int8WeightOnly(),
    pyquant.Int8Dynamic(),
    pyquant.Int4WeightOnly(group_size=32, symmetric=False),
    pyquant.Int4WeightOnly(group_size=32, symmetric=True),
]
_NP = {"F32": np.float32, "U8": np.uint8, "I8": np.int8, "F16": np.float16, "BOOL": np.uint8}


@pytest.fixture(autouse=True)
def _reference_backend():
    # Deterministic and independent of whether the native module is built.
    with pyquant.use_backend("reference"):
        yield


def make_model(seed: int = 0) -> nn.Sequential:
    """No-bias Linear, biased Linear, and a K=40 Linear that int4 g32 must leave float."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 40), nn.GELU(), nn.Linear(40, 16)
    )


def saved(tmp_path, config=pyquant.Int8WeightOnly(), mutate=None, model=None):
    """Quantize, optionally damage the model (``mutate(model)``), save; -> (path, model, x, y)."""
    model = model if model is not None else make_model()
    pyquant.quantize_(model, config)
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    y = model(x) if mutate is None else None
    path = tmp_path / "model.safetensors"
    pyquant.save(model, path)
    return path, model, x, y


def read_raw(path):
    b = pathlib.Path(path).read_bytes()
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8:8 + n]), bytearray(b[8 + n:])


def write_raw(path, header, data):
    blob = json.dumps(header).encode()
    pathlib.Path(path).write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(data))


def edit_tensor(path, key, fn):
    header, data = read_raw(path)
    e = header[key]
    b, end = e["data_offsets"]
    arr = np.frombuffer(data, dtype=_NP[e["dtype"]], count=(end - b) // np.dtype(
        _NP[e["dtype"]]).itemsize, offset=b)
    fn(arr.reshape(e["shape"]))
    write_raw(path, header, data)


def edit_meta(path, fn):
    header, data = read_raw(path)
    fn(header["__metadata__"])
    write_raw(path, header, data)


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("meta", [False, True], ids=["float", "meta"])
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_round_trip(tmp_path, config, meta):
    path, model, x, y = saved(tmp_path, config)
    if meta:
        with torch.device("meta"):
            skeleton = make_model(seed=7)
    else:
        skeleton = make_model(seed=7)  # different float weights: all must be overwritten
    loaded = pyquant.load(skeleton, str(path))
    assert loaded is skeleton
    assert [type(m) for m in loaded] == [type(m) for m in model]
    if isinstance(config, pyquant.Int4WeightOnly):
        assert type(loaded[4]) is nn.Linear  # K=40 was skipped and stays float
    assert not any(t.is_meta for t in loaded.state_dict().values())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded(x), y)


def test_mixed_schemes_bf16_and_pathlike(tmp_path):
    model = make_model().to(torch.bfloat16)
    pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=32), lambda m, fqn: fqn == "0")
    pyquant.quantize_(model, pyquant.Int8Dynamic())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    path = tmp_path / "mixed.safetensors"
    pyquant.save(model, path)  # pathlib.Path
    meta = read_raw(path)[0]["__metadata__"]
    assert meta["format"] == "pyquant" and meta["format_version"] == "1"
    assert meta["pyquant_version"] == pyquant.__version__
    layers = json.loads(meta["layers"])
    assert config_from_dict(layers["0"]["config"]) == pyquant.Int4WeightOnly(group_size=32)
    assert config_from_dict(layers["2"].pop("config")) == pyquant.Int8Dynamic()
    assert layers["2"] == {"in_features": 32, "out_features": 40, "bias": True,
                           "bias_dtype": "bfloat16"}
    with torch.device("meta"):
        skeleton = make_model().to(torch.bfloat16)
    loaded = pyquant.load(skeleton, path)
    assert loaded[2].bias.dtype == torch.bfloat16 and loaded[4].bias.dtype == torch.bfloat16
    assert torch.equal(loaded(x), model(x))


def test_readable_by_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = make_model().to(torch.bfloat16)
    pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=32))
    model.register_buffer("flag", torch.tensor([True, False]))
    model.register_buffer("count", torch.tensor(3, dtype=torch.int64))
    path = tmp_path / "m.safetensors"
    pyquant.save(model, path)
    got = st.load_file(str(path))
    want = model.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with open(path, "rb") as f:  # data section 8-byte aligned, like the reference writer
        assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0


class Tied(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_tied_weights_stored_once(tmp_path):
    model = Tied()
    pyquant.quantize_(model, pyquant.Int8WeightOnly(), lambda m, fqn: fqn == "body")
    path = tmp_path / "tied.safetensors"
    pyquant.save(model, path)
    header, _ = read_raw(path)
    assert "head.weight" not in header and "embed.weight" in header
    assert json.loads(header["__metadata__"]["aliases"]) == {"head.weight": "embed.weight"}
    ids = torch.tensor([[1, 2, 3]])
    with torch.device("meta"):
        skeleton = Tied()
    loaded = pyquant.load(skeleton, path)
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # still tied
    assert torch.equal(loaded(ids), model(ids))
    with torch.device("meta"):
        untied = Tied(tie=False)
    loaded = pyquant.load(untied, path)  # values equal, but not tied behind the model's back
    assert loaded.head.weight.data_ptr() != loaded.embed.weight.data_ptr()
    assert torch.equal(loaded(ids), model(ids))


def test_shared_linear_round_trip(tmp_path):
    """A quantized layer two parents share (module reuse) is named twice in the checkpoint:
    a skeleton that shares its Linear loads one layer in both places, one that does not loads
    two equal ones; both give the saved model's output."""
    torch.manual_seed(0)
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    pyquant.quantize_(model, pyquant.Int8WeightOnly())
    x = torch.randn(3, 64)
    path = tmp_path / "shared.safetensors"
    pyquant.save(model, path)
    lin = nn.Linear(64, 64)
    tied = pyquant.load(nn.Sequential(lin, nn.ReLU(), lin), path)
    assert tied[0] is tied[2] and isinstance(tied[0], pyquant.Int8WeightOnlyLinear)
    untied = pyquant.load(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), path)
    assert untied[0] is not untied[2] and isinstance(untied[2], pyquant.Int8WeightOnlyLinear)
    for loaded in (tied, untied):
        assert torch.equal(loaded(x), model(x))


def test_wrong_kinds_of_file_and_folder_are_named(tmp_path):
    """A torch.save archive is named as such (not as an impossible header length), and a save
    into a folder that does not exist names the folder (not the temporary file)."""
    torch.save({"a": torch.ones(3)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="zip archive, as torch.save writes"):
        pyquant.load(nn.Sequential(nn.Linear(8, 8)), tmp_path / "model.pt")
    missing = tmp_path / "no" / "such" / "x.safetensors"
    with pytest.raises(FileNotFoundError, match=r"the folder .*such does not exist"):
        pyquant.save(nn.Sequential(nn.Linear(8, 8)), missing)


def test_hf_models_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    bert_cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32)
    llama_cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    cases = [(transformers.BertModel, bert_cfg, pyquant.Int8Dynamic()),
             (transformers.LlamaForCausalLM, llama_cfg, pyquant.Int4WeightOnly(group_size=32))]
    for cls, cfg, qcfg in cases:
        torch.manual_seed(0)
        model = cls(cfg).eval()
        report = pyquant.quantize_(model, qcfg)
        assert len(report.swapped) >= 12
        path = tmp_path / f"{cls.__name__}.safetensors"
        pyquant.save(model, path)
        torch.manual_seed(1)
        loaded = pyquant.load(cls(cfg).eval(), path)
        out = lambda m: m(ids)[0]  # noqa: E731
        with torch.no_grad():
            assert torch.equal(out(loaded), out(model)), cls.__name__


def test_load_into_already_quantized_model(tmp_path):
    path, model, x, y = saved(tmp_path, INT4)  # layers 0 and 2 int4, layer 4 (K=40) float
    target = make_model(seed=5)
    pyquant.quantize_(target, pyquant.Int8WeightOnly(), lambda m, fqn: fqn == "0")
    assert torch.equal(pyquant.load(target, path)(x), y)  # the file's scheme replaces layer 0's
    assert type(target[0]) is pyquant.Int4WeightOnlyLinear
    target = make_model(seed=5)
    pyquant.quantize_(target, pyquant.Int8WeightOnly())  # layer 4 quantized, the file has float
    with pytest.raises(ValueError, match="'4.weight' is torch.float32, the model expects .*int8"):
        pyquant.load(target, path)


def test_save_is_atomic_and_overwrites(tmp_path):
    path, model, x, y = saved(tmp_path)
    pyquant.save(model, os.fspath(path))  # overwrite in place
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left
    bad = make_model()
    with torch.device("meta"):
        bad.add_module("ghost", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'ghost.weight' is on the meta device"):
        pyquant.save(bad, path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert torch.equal(pyquant.load(make_model(), path)(x), y)  # the old file survived


def test_strict_false_and_leftover_meta_warning(tmp_path):
    path, model, x, y = saved(tmp_path)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \['extra'\]"):
        skeleton = make_model()
        skeleton.register_buffer("extra", torch.zeros(3))
        pyquant.load(skeleton, path)
    skeleton = make_model()
    skeleton.register_buffer("extra", torch.zeros(3))
    assert torch.equal(pyquant.load(skeleton, path, strict=False)(x), y)
    with torch.device("meta"):
        skeleton = make_model()
        skeleton.register_buffer("cache", torch.zeros(3), persistent=False)
    with pytest.warns(RuntimeWarning, match=r"still on the meta device.*cache"):
        pyquant.load(skeleton, path)


def test_compiled_models_save_and_load_as_the_plain_one(tmp_path):
    """A torch.compile wrapper's state_dict names carry "_orig_mod.": loading into a compiled
    skeleton with strict=False used to swap the layers and leave them empty (zero codes, unit
    scales, no error), and saving a compiled model wrote names a plain skeleton refused."""
    path, model, x, y = saved(tmp_path)
    compiled = torch.compile(make_model(), backend="eager")
    assert pyquant.load(compiled, path, strict=False) is compiled
    assert torch.equal(compiled._orig_mod(x), y)
    p2 = tmp_path / "compiled.safetensors"
    pyquant.save(torch.compile(model, backend="eager"), p2)
    assert torch.equal(pyquant.load(make_model(), p2)(x), y)


def test_a_bare_layer_is_refused_at_save_not_at_load(tmp_path):
    layer = pyquant.Int8WeightOnlyLinear.from_float(nn.Linear(64, 32), pyquant.Int8WeightOnly())
    with pytest.raises(ValueError, match=r"itself a Int8WeightOnlyLinear.*Sequential\(layer\)"):
        pyquant.save(layer, tmp_path / "layer.safetensors")
    assert not (tmp_path / "layer.safetensors").exists()
    pyquant.save(nn.Sequential(layer), tmp_path / "seq.safetensors")
    got = pyquant.load(nn.Sequential(nn.Linear(64, 32)), tmp_path / "seq.safetensors")
    x = torch.randn(3, 64)
    assert torch.equal(got(x), layer(x))


def test_float_weights_into_a_quantized_model_are_refused():
    """load_state_dict(float_model.state_dict(), strict=False) into a quantized model used to
    cast the float weights into the int8 codes (all zeros) and report only a missing scale."""
    float_model = make_model()
    model = make_model()
    pyquant.quantize_(model, pyquant.Int8WeightOnly())
    with pytest.raises(RuntimeError, match=r"0\.weight: Int8WeightOnlyLinear keeps torch\.int8"):
        model.load_state_dict(float_model.state_dict(), strict=False)


def test_failed_load_leaves_model_untouched(tmp_path):
    path, *_ = saved(tmp_path, mutate=lambda m: m[2].weight_scale.fill_(float("nan")))
    skeleton = make_model(seed=3)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        pyquant.load(skeleton, path)
    assert all(type(m) is nn.Linear for m in (skeleton[0], skeleton[2], skeleton[4]))
    assert all(torch.equal(skeleton.state_dict()[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------ damaged files

def _truncate(at):
    def fn(path):
        b = path.read_bytes()
        path.write_bytes(b[: at(b)])
    return fn


def _header_len(value):
    def fn(path):
        b = path.read_bytes()
        path.write_bytes(value.to_bytes(8, "little") + b[8:])
    return fn


def _entry(key, field, value):
    def fn(path):
        header, data = read_raw(path)
        header[key][field] = value
        write_raw(path, header, data)
    return fn


def _invalid_json(path):
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    path.write_bytes(b[:8] + b"{not json".ljust(n) + b[8 + n:])


def _overlap(path):
    header, data = read_raw(path)
    header["2.weight_scale"]["data_offsets"] = header["2.bias"]["data_offsets"]
    write_raw(path, header, data)


def _duplicate_key(path):
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    blob = b[8:8 + n].rstrip().replace(b'"__metadata__":', b'"0.weight":{},"__metadata__":')
    blob = blob.replace(b"{", b'{"0.weight":{},', 1)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b[8 + n:])


def _bool_byte(path):
    header, data = read_raw(path)
    data[header["flag"]["data_offsets"][0]] = 2
    write_raw(path, header, data)


FILE_DAMAGE = {
    "empty": (_truncate(lambda b: 0), "too short"),
    "in-length": (_truncate(lambda b: 5), "too short"),
    "in-header": (_truncate(lambda b: 40), "header length .* impossible"),
    "mid-data": (_truncate(lambda b: len(b) - 300), "truncated"),
    "last-byte": (_truncate(lambda b: len(b) - 1), "truncated"),
    "trailing": (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "unexpected bytes"),
    "huge-length": (_header_len(2**63 + 5), "header length"),
    "negative-length": (_header_len(2**64 - 16), "header length"),
    "invalid-json": (_invalid_json, "not valid JSON"),
    "duplicate-key": (_duplicate_key, "duplicate key"),
    "not-object": (lambda p: write_raw(p, [1, 2], b""), "must be a JSON object"),
    "unknown-dtype": (_entry("2.bias", "dtype", "F8_E4M3"), "'2.bias': unknown dtype 'F8_E4M3'"),
    "shape-negative": (_entry("2.bias", "shape", [-40]), "'2.bias': shape must be"),
    "shape-float": (_entry("2.bias", "shape", [40.0]), "'2.bias': shape must be"),
    "offsets-vs-size": (_entry("2.bias", "shape", [41]),
                        r"span 160 bytes but F32 \[41\] needs 164"),
    "offsets-reversed": (_entry("2.bias", "data_offsets", [8, 0]), "0 <= begin <= end"),
    "offsets-out-of-bounds": (_entry("4.bias", "data_offsets", [10**6, 10**6 + 64]), "truncated"),
    "offsets-overlap": (_overlap, "overlap"),
    "extra-field": (_entry("2.bias", "extra", 1), "expected an object with dtype"),
    "bool-byte": (_bool_byte, "'flag': BOOL data holds bytes other than 0 and 1"),
    "not-pyquant": (lambda p: edit_meta(p, lambda m: m.update(format="other")),
                    "not a pyquant checkpoint"),
    "format-version": (lambda p: edit_meta(p, lambda m: m.update(format_version="2")),
                       "unsupported format_version '2'"),
    "layers-json": (lambda p: edit_meta(p, lambda m: m.update(layers="{")),
                    r"__metadata__\['layers'\] is not valid JSON"),
    "layers-config": (lambda p: edit_meta(p, lambda m: m.update(layers=m["layers"].replace(
        '"int8_weight_only"', '"int3"'))), "layer '0': bad config .*unknown quantization scheme"),
    "layers-features": (lambda p: edit_meta(p, lambda m: m.update(layers=m["layers"].replace(
        '"in_features": 64', '"in_features": "64"'))), "layer '0': in_features='64'"),
    "alias-target": (lambda p: edit_meta(p, lambda m: m.update(aliases='{"x": "nope"}')),
                     "alias 'x' -> 'nope'"),
}


@pytest.mark.parametrize("damage", FILE_DAMAGE, ids=str)
def test_damaged_file(tmp_path, damage):
    fn, match = FILE_DAMAGE[damage]
    model = make_model()
    model.register_buffer("flag", torch.tensor([True, False]))
    path, *_ = saved(tmp_path, model=model)
    fn(path)
    skeleton = make_model()
    skeleton.register_buffer("flag", torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=match) as info:
        pyquant.load(skeleton, path)
    assert str(path) in str(info.value)


def _set(attr, index, value):
    def fn(model):
        getattr(model[2], attr)[index] = value
    return fn


def _replace(attr, tensor):
    def fn(model):
        setattr(model[2], attr, tensor)
    return fn


INT4 = pyquant.Int4WeightOnly(group_size=32)
BAD_VALUES = {
    "scale-nan": (None, _set("weight_scale", 3, float("nan")),
                  r"'2': weight_scale has 1 bad .*1 NaN"),
    "scale-inf": (None, _set("weight_scale", 0, float("inf")), r"weight_scale has 1 bad .*1 inf"),
    "scale-zero": (None, _set("weight_scale", 1, 0.0), r"weight_scale has 1 bad .*1 finite <= 0"),
    "scale-negative": (None, _set("weight_scale", slice(0, 2), -1.0), r"2 bad .*2 finite <= 0"),
    "int4-scale-nan": (INT4, _set("weight_scales", (0, 0), float("nan")), "weight_scales has 1"),
    "int8-minus-128": (None, _set("weight", (1, 2), -128), "1 value.* of -128"),
    "int4-zero-16": (INT4, _set("weight_zeros", (0, 0), 16), r"weight_zeros has 1 value\(s\) > 15"),
    "shape": (None, _replace("weight_scale", torch.ones(39)),
              r"'2': '2.weight_scale' is torch.float32 \[39\], expected torch.float32 \[40\]"),
    "dtype": (None, _replace("weight_scale", torch.ones(40, dtype=torch.float16)),
              "'2.weight_scale' is torch.float16 .*expected torch.float32"),
    "int4-packed-shape": (INT4, _replace("weight_packed", torch.zeros(40, 32, dtype=torch.uint8)),
                          r"expected torch.uint8 \[40, 16\]"),
    "missing": (INT4, lambda m: m[2]._buffers.pop("weight_zeros"),
                "layer '2': buffer '2.weight_zeros' is missing"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=str)
def test_bad_quantized_buffers(tmp_path, case):
    config, mutate, match = BAD_VALUES[case]
    path, *_ = saved(tmp_path, config or pyquant.Int8WeightOnly(), mutate)
    with pytest.raises(ValueError, match=match):
        pyquant.load(make_model(), path)


def test_bias_dtype_must_match_metadata(tmp_path):
    path, *_ = saved(tmp_path)
    edit_meta(path, lambda m: m.update(layers=m["layers"].replace('"float32"', '"float16"')))
    with pytest.raises(ValueError, match=r"'2.bias' is torch.float32 \[40\], expected .*float16"):
        pyquant.load(make_model(), path)


def test_bad_values_written_by_hand(tmp_path):
    # The loader must not trust its own writer: damage the stored bytes directly.
    path, *_ = saved(tmp_path, INT4)
    edit_tensor(path, "0.weight_zeros", lambda a: a.__setitem__((3, 1), 200))
    with pytest.raises(ValueError, match=r"layer '0': weight_zeros has 1 value"):
        pyquant.load(make_model(), path)
    path, *_ = saved(tmp_path, pyquant.Int8Dynamic())
    edit_tensor(path, "4.weight", lambda a: a.__setitem__((0, slice(0, 3)), -128))
    with pytest.raises(ValueError, match=r"layer '4': int8 weight has 3 value"):
        pyquant.load(make_model(), path)


MODEL_MISMATCH = {
    "missing-module": (lambda: nn.Sequential(nn.Linear(64, 32, bias=False)),
                       "layer '2' named in the checkpoint does not exist"),
    "not-linear": (lambda: nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.ReLU()),
                   "layer '2': the model has a ReLU there, expected an nn.Linear"),
    "features": (lambda: nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(),
                                       nn.Linear(32, 8)),
                 "layer '2': the model's Linear has in_features=32, out_features=8; the "
                 "checkpoint has in_features=32, out_features=40"),
    # a bias the checkpoint's layer lacks, or the other way round: another architecture (the
    # layer used to follow the checkpoint silently)
    "bias-extra": (lambda: nn.Sequential(nn.Linear(64, 32), *list(make_model())[1:]),
                   r"layer '0': the model's Linear has a bias, the checkpoint's layer has none; "
                   r"build the model as it was saved \(bias=False\)"),
    "bias-missing": (lambda: nn.Sequential(*list(make_model())[:2], nn.Linear(32, 40, bias=False),
                                           *list(make_model())[3:]),
                     "layer '2': the model's Linear has no bias, the checkpoint's layer has one"),
    "float-shape": (lambda: nn.Sequential(*list(make_model())[:4], nn.Linear(40, 17)),
                    r"tensor '4.weight' has shape \[16, 40\], the model expects \[17, 40\]"),
}


@pytest.mark.parametrize("case", MODEL_MISMATCH, ids=str)
def test_model_mismatch(tmp_path, case):
    build, match = MODEL_MISMATCH[case]
    path, *_ = saved(tmp_path, INT4)  # layer 4 (K=40) stays float
    with pytest.raises(ValueError, match=match):
        pyquant.load(build(), path)


# ------------------------------------------------------------------------------ fuzz

def test_fuzz_never_crashes(tmp_path):
    model = make_model()
    pyquant.quantize_(model, INT4, lambda m, fqn: fqn == "0")
    pyquant.quantize_(model, pyquant.Int8Dynamic())
    good = tmp_path / "good.safetensors"
    pyquant.save(model, good)
    blob = good.read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    rng = random.Random(1234)
    x = torch.randn(2, 64)
    outcomes = {"ok": 0, "ValueError": 0}
    bad = tmp_path / "bad.safetensors"
    for i in range(100):
        b = bytearray(blob)
        if i % 2:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 4)):  # half the flips land in the header
                pos = rng.randrange(header_end if rng.random() < 0.5 else len(b))
                b[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(b))
        try:
            loaded = pyquant.load(make_model(), bad)
        except ValueError:
            outcomes["ValueError"] += 1
            continue
        outcomes["ok"] += 1
        loaded(x)  # whatever loaded passed validation, so the kernels must run on it
    assert outcomes["ValueError"] >= 50  # every truncation, and most flips
