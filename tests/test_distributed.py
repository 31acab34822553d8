"""Tensor parallelism (pyquant.distributed) on 2 gloo ranks on the CPU.

One module-scoped fixture spawns the 2 ranks once (torch.multiprocessing, a FileStore in a tmp
dir: no port), and each rank runs every scenario on tiny random Llama and BERT models from
transformers (hidden 128, 4 heads, 2 layers, intermediate 256) for float nn.Linear and each
quantization config, saving what it saw; the tests below then judge those results one by one.
Every rank computes the single-process reference itself (same seed, same model), so no tensor
crosses between ranks except through the collectives under test.
"""
from __future__ import annotations

import copy
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyquant
import pyquant.distributed as tp
from pyquant.distributed import layers as tp_layers
from pyquant.distributed import plan as tp_plan
from helpers import assert_close_named

transformers = pytest.importorskip("transformers")

WORLD = 2
CONFIGS = {
    "float": None,
    "int8_weight_only": pyquant.Int8WeightOnly(),
    "int8_dynamic": pyquant.Int8Dynamic(),
    "int4_weight_only": pyquant.Int4WeightOnly(group_size=32),
}
if hasattr(pyquant, "Int4Dynamic"):
    CONFIGS["int4_dynamic"] = pyquant.Int4Dynamic(group_size=32)
ARCHS = ("llama", "bert")
CASES = [(a, c) for a in ARCHS for c in CONFIGS]
DICT_PLAN_CONFIGS = [c for c in ("float", "int8_dynamic", "int4_dynamic") if c in CONFIGS]
QUANT_CASES = [(a, c) for a, c in CASES if CONFIGS[c] is not None]
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "send", "recv",
               "scatter", "gather", "all_gather_object", "broadcast_object_list")


# ------------------------------------------------------------------------------ the models


def make_model(arch: str, seed: int = 0, hidden=128, heads=4, kv_heads=2, inter=256):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
            intermediate_size=inter, num_hidden_layers=2, vocab_size=256,
            max_position_embeddings=64, attention_bias=True, mlp_bias=True)
        return _random_biases(transformers.LlamaForCausalLM(cfg).eval())
    cfg = transformers.BertConfig(
        hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
        num_hidden_layers=2, vocab_size=256, max_position_embeddings=64)
    return _random_biases(transformers.BertModel(cfg).eval())


def _random_biases(model):
    """Hugging Face initializes biases to 0, which would hide a bias added twice or never;
    the Llama model gets biases on its attention projections for the same reason."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


def model_inputs(arch: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 8), generator=g)
    if arch == "llama":
        return {"input_ids": ids, "use_cache": False}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model, arch):
    with torch.no_grad():
        out = model(**model_inputs(arch))
    return (out.logits if arch == "llama" else out.last_hidden_state).detach().clone()


class NoCollectives:
    """Any torch.distributed collective called inside the block raises (and is recorded)."""

    def __enter__(self):
        self.saved, self.called = {}, []
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self.saved[name] = getattr(dist, name)

                def boom(*a, _name=name, **k):
                    self.called.append(_name)
                    raise AssertionError(f"collective {_name} called")

                setattr(dist, name, boom)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mismatches(a: dict, b: dict) -> list:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(a.keys() ^ b.keys())[:5]}"]
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def expect_error(fn, model):
    """(message, collectives called, model unchanged) of a call that should raise."""
    before, types = state(model), [type(m) for m in model.modules()]
    with NoCollectives() as nc:
        try:
            fn()
            msg = None
        except ValueError as e:
            msg = str(e)
    unchanged = not mismatches(before, state(model)) and types == [type(m) for m in
                                                                   model.modules()]
    return msg, nc.called, unchanged


# ------------------------------------------------------------------ what each rank does


def _scenarios(rank: int, out_dir: str) -> dict:
    res = {}
    for arch in ARCHS:
        base = make_model(arch)
        for name, qc in CONFIGS.items():
            ref = copy.deepcopy(base)
            if qc is not None:
                pyquant.quantize_(ref, qc)
            y_ref = run(ref, arch)
            sharded = copy.deepcopy(ref)
            rep = tp.tensor_parallel_(sharded)
            with tp.record_collectives() as log:
                res[arch, name, "out"] = (run(sharded, arch), y_ref)
            res[arch, name, "collectives"] = log.calls
            with tp.record_collectives() as replayed:  # the demo's replay, gather branch
                for call in log.calls:
                    tp_layers.replay_collective(*call[:2])
            res[arch, name, "replayed"] = replayed.calls
            # the all_reduce path that larger activations take (GATHER_REDUCE_MAX_NUMEL)
            saved, tp_layers.GATHER_REDUCE_MAX_NUMEL = tp_layers.GATHER_REDUCE_MAX_NUMEL, 0
            try:
                with tp.record_collectives() as log:
                    res[arch, name, "out_all_reduce"] = run(sharded, arch)
                res[arch, name, "collectives_all_reduce"] = log.calls
                # the demo times a forward's collectives alone by replaying its log
                with tp.record_collectives() as replayed:
                    for call in log.calls:
                        tp_layers.replay_collective(*call[:2])
                res[arch, name, "replayed_all_reduce"] = replayed.calls
            finally:
                tp_layers.GATHER_REDUCE_MAX_NUMEL = saved
            res[arch, name, "bytes"] = (rep.bytes_after, rep.bytes_before,
                                        tp.linear_bytes(sharded), tp.linear_bytes(ref))
            res[arch, name, "layers"] = dict(rep.layers)
            if qc is not None:  # shard the float model, then quantize the shards
                s2 = copy.deepcopy(base)
                tp.tensor_parallel_(s2)
                tp.quantize_(s2, qc)
                res[arch, name, "shard_then_quantize"] = mismatches(state(sharded), state(s2))
            path = os.path.join(out_dir, f"{arch}-{name}.safetensors")
            if rank == 0:
                pyquant.save(ref, path)
            dist.barrier()
            skeleton = make_model(arch, seed=123)  # other random weights: all must be replaced
            lrep = tp.load_sharded(skeleton, path)
            res[arch, name, "load"] = (mismatches(state(sharded), state(skeleton)),
                                       run(skeleton, arch), lrep.bytes_after)

    # misaligned: int4 groups of 128 cannot be cut in two along K=128 (64 per rank)
    llama = make_model("llama")
    pyquant.quantize_(llama, pyquant.Int4WeightOnly(group_size=128))
    res["misaligned_int4"] = expect_error(lambda: tp.tensor_parallel_(llama), llama)
    path = os.path.join(out_dir, "llama-int4-g128.safetensors")
    if rank == 0:
        pyquant.save(llama, path)
    dist.barrier()
    skeleton = make_model("llama", seed=5)
    res["misaligned_load"] = expect_error(lambda: tp.load_sharded(skeleton, path), skeleton)
    # shard, then quantize with groups the whole layer holds and its shard does not (o_proj's
    # K = 128 cut in two for groups of 128): refused before any layer changes, as the other
    # order refuses the cut
    shard_first = make_model("llama")
    tp.tensor_parallel_(shard_first)
    res["misaligned_shard_then_quantize"] = expect_error(
        lambda: tp.quantize_(shard_first, pyquant.Int4WeightOnly(group_size=128)), shard_first)
    # lm_head tied to the embedding stays float in both orders (the cut unties the shard)
    tied = make_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    q_first, s_first = copy.deepcopy(tied), copy.deepcopy(tied)
    skipped = dict(pyquant.quantize_(q_first, pyquant.Int4WeightOnly(group_size=32)).skipped)
    tp.tensor_parallel_(q_first)
    tp.tensor_parallel_(s_first)
    rep = tp.quantize_(s_first, pyquant.Int4WeightOnly(group_size=32))
    res["tied_lm_head"] = (mismatches(state(q_first), state(s_first)), skipped.get("lm_head"),
                           dict(rep.skipped).get("lm_head"))
    # misaligned: 3 heads over 2 ranks (every size is even, so only the heads check catches it)
    bert3 = make_model("bert", hidden=96, heads=3, inter=192)
    res["misaligned_heads"] = expect_error(lambda: tp.tensor_parallel_(bert3), bert3)
    # a dict plan naming a layer that does not exist, and one with an unknown style
    res["bad_fqn"] = expect_error(
        lambda: tp.tensor_parallel_(bert3, {"encoder.layer.7.output.dense": "rowwise"}), bert3)
    res["bad_style"] = expect_error(
        lambda: tp.tensor_parallel_(bert3, {"encoder.layer.0.output.dense": "diagonal"}), bert3)

    # a dict plan with a lone row-parallel layer: it cuts its whole input itself
    for name in DICT_PLAN_CONFIGS:
        m = make_model("llama")
        if CONFIGS[name] is not None:
            pyquant.quantize_(m, CONFIGS[name])
        y_ref = run(m, "llama")
        tp.tensor_parallel_(m, {"model.layers.*.mlp.down_proj": "rowwise",
                                "lm_head": "colwise_gather"})
        res["dict_plan", name] = (run(m, "llama"), y_ref)
    return res


def _rank_main(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    res = {}
    try:
        store = dist.FileStore(os.path.join(tmp, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        res = _scenarios(rank, tmp)
    except BaseException:
        res["error"] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tp"))
    ctx = mp.start_processes(_rank_main, args=(WORLD, tmp), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = 240
    import time

    t0 = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - t0 > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {deadline} s")
    out = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
           for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return out


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("arch,config", CASES)
def test_sharded_output_equals_single_process(ranks, arch, config):
    """Both ways of reducing the row-parallel partials: gathered and added in rank order
    (small tensors on gloo) and all_reduce (larger ones)."""
    for r, res in enumerate(ranks):
        y_tp, y_ref = res[arch, config, "out"]
        assert_close_named(y_tp, y_ref, "tensor_parallel/float32", f"rank {r}")
        assert_close_named(res[arch, config, "out_all_reduce"], y_ref, "tensor_parallel/float32",
                           f"rank {r}, all_reduce")


@pytest.mark.parametrize("arch,config", CASES)
def test_a_forward_makes_only_the_collectives_of_the_plan(ranks, arch, config):
    """Per block, one fp32 reduction after each row-parallel layer (attention output, MLP
    down), preceded by the MAX of the activation rows' max |x| for the configs that quantize
    activations; the Llama lm_head gathers its columns once. Anything more costs a latency
    per call (docs/distributed.md), so an extra one fails here. These tensors are small, so
    on gloo each reduction is one all_gather (then added locally); with the threshold at 0,
    an all_reduce."""
    tokens, hidden, vocab = 16, 128, 256  # model_inputs: 2 x 8 tokens; make_model
    assert tokens * hidden * WORLD <= tp_layers.GATHER_REDUCE_MAX_NUMEL
    for kind, suffix in (("all_gather", ""), ("all_reduce", "_all_reduce")):
        dyn = config in ("int8_dynamic", "int4_dynamic")
        amax = [(f"{kind}_max", tokens)] if dyn else []
        want = (amax + [(f"{kind}_sum", tokens * hidden)]) * 4  # 2 blocks x 2 row-parallel
        if arch == "llama":
            want.append(("all_gather", tokens * vocab // WORLD))
        for r, res in enumerate(ranks):
            calls = res[arch, config, "collectives" + suffix]
            assert [(n, k) for n, k, _, _ in calls] == want, f"rank {r}, {kind}"
            assert all(0 <= t1 - t0 < 60 for *_, t0, t1 in calls), f"rank {r}: times {calls}"
            # a replay of the log issues the same collectives through the same path
            replayed = res[arch, config, "replayed" + suffix]
            assert [(n, k) for n, k, _, _ in replayed] == want, f"rank {r}, replay"


def test_replaying_an_unknown_collective_says_which():
    with pytest.raises(ValueError, match="unknown collective 'all_to_all_sum'"):
        tp_layers.replay_collective("all_to_all_sum", 4)


@pytest.mark.parametrize("arch,config", CASES)
def test_each_rank_holds_about_half_of_the_linear_weights(ranks, arch, config):
    for r, res in enumerate(ranks):
        after, before, measured_after, measured_before = res[arch, config, "bytes"]
        assert (after, before) == (measured_after, measured_before)
        # replicated: row-parallel biases, int8 per-channel scales of row-parallel layers, and
        # BERT's pooler (not in a block); everything else is split in two
        assert 0.45 <= after / before <= 0.56, f"rank {r}: {after} of {before} bytes"


def test_auto_plan_covers_every_block_layer(ranks):
    llama = ranks[0]["llama", "float", "layers"]
    for i in range(2):
        p = f"model.layers.{i}."
        assert {k: v for k, v in llama.items() if k.startswith(p)} == {
            p + "self_attn.q_proj": "colwise", p + "self_attn.k_proj": "colwise",
            p + "self_attn.v_proj": "colwise", p + "self_attn.o_proj": "rowwise",
            p + "mlp.gate_proj": "colwise", p + "mlp.up_proj": "colwise",
            p + "mlp.down_proj": "rowwise"}
    assert llama["lm_head"] == "colwise_gather"
    bert = ranks[0]["bert", "float", "layers"]
    for i in range(2):
        p = f"encoder.layer.{i}."
        assert {k: v for k, v in bert.items() if k.startswith(p)} == {
            p + "attention.self.query": "colwise", p + "attention.self.key": "colwise",
            p + "attention.self.value": "colwise", p + "attention.output.dense": "rowwise",
            p + "intermediate.dense": "colwise", p + "output.dense": "rowwise"}
    assert len(bert) == 12  # the pooler stays whole


@pytest.mark.parametrize("arch,config", QUANT_CASES)
def test_shard_then_quantize_equals_quantize_then_shard(ranks, arch, config):
    for r, res in enumerate(ranks):
        assert res[arch, config, "shard_then_quantize"] == [], f"rank {r}"


@pytest.mark.parametrize("arch,config", CASES)
def test_load_sharded_reads_each_ranks_slice_of_one_checkpoint(ranks, arch, config):
    for r, res in enumerate(ranks):
        bad, y, nbytes = res[arch, config, "load"]
        assert bad == [], f"rank {r}: buffers differ from the sharded model: {bad[:5]}"
        assert_close_named(y, res[arch, config, "out"][1], "tensor_parallel/float32", f"rank {r}")
        assert nbytes == res[arch, config, "bytes"][0]


def test_misaligned_int4_groups_fail_before_any_cut_or_collective(ranks):
    for res in ranks:
        msg, called, unchanged = res["misaligned_int4"]
        assert msg is not None, "no ValueError"
        assert called == [] and unchanged
        # o_proj (K=128) cannot hold whole groups of 128 in halves; down_proj (K=256) can
        assert "model.layers.0.self_attn.o_proj" in msg and "model.layers.1.self_attn.o_proj" in msg
        assert "down_proj" not in msg
        assert "in_features=128 split 2 ways is 64 per shard, which must be a whole multiple " \
               "of 128 (group_size=128" in msg and "world_size=2" in msg
        assert "world sizes that work for this layer: 1\n" in msg
        assert msg.rstrip().endswith("work for every layer: 1")


def test_shard_then_quantize_refuses_groups_the_shards_cannot_hold(ranks):
    """It used to leave those shards float, with a skip reason that named a group size for the
    shard rather than the cut; quantize-then-shard refuses the same cut."""
    for res in ranks:
        msg, called, unchanged = res["misaligned_shard_then_quantize"]
        assert msg is not None, "no ValueError"
        assert called == [] and unchanged
        assert "the whole layer fits the config but its shard does not" in msg
        assert "model.layers.0.self_attn.o_proj (128 x 128 cut rowwise over 2" in msg
        assert "K=64 is not a multiple of group_size=128" in msg
        assert "down_proj" not in msg


def test_shard_then_quantize_keeps_a_tied_lm_head_float_as_quantize_does(ranks):
    for r, res in enumerate(ranks):
        bad, why_whole, why_shard = res["tied_lm_head"]
        assert bad == [], f"rank {r}: {bad[:5]}"
        assert why_whole and "tied to model.embed_tokens" in why_whole
        assert why_shard == why_whole


def test_shard_then_quantize_refuses_a_sparsity_config():
    with pytest.raises(TypeError, match=r"Sparse24 is a sparsity config: prune the whole model "
                                        r"before sharding it \(pyquant\.sparsify_"):
        tp.quantize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), pyquant.Sparse24())


def test_misaligned_load_sharded_fails_before_reading(ranks):
    for res in ranks:
        msg, called, unchanged = res["misaligned_load"]
        assert msg is not None and "group_size=128" in msg and called == [] and unchanged


def test_head_count_not_divisible_is_named_with_working_world_sizes(ranks):
    for res in ranks:
        msg, called, unchanged = res["misaligned_heads"]
        assert msg is not None and called == [] and unchanged
        assert "3 attention heads (of encoder.layer.0.attention.self) do not split 2 ways" in msg
        assert "num_attention_heads=3 does not split 2 ways" in msg
        assert msg.rstrip().endswith("work for every layer: 1, 3")


def test_bad_dict_plans_are_named(ranks):
    for res in ranks:
        msg, called, unchanged = res["bad_fqn"]
        assert "'encoder.layer.7.output.dense': no such module" in msg and called == []
        msg, called, unchanged = res["bad_style"]
        assert "unknown style 'diagonal'" in msg and called == [] and unchanged


@pytest.mark.parametrize("config", DICT_PLAN_CONFIGS)
def test_dict_plan_rowwise_layer_cuts_a_whole_input(ranks, config):
    for r, res in enumerate(ranks):
        y, y_ref = res["dict_plan", config]
        assert_close_named(y, y_ref, "tensor_parallel/float32", f"rank {r}")


# ------------------------------------------------------- one process: the layers' shard rules


def _float_linear(n, k, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    return lin


@pytest.mark.parametrize("config", [c for c in CONFIGS.values() if c is not None],
                         ids=[n for n, c in CONFIGS.items() if c is not None])
@pytest.mark.parametrize("dim", [0, 1])
def test_layer_shards_concatenate_to_the_whole_layer(config, dim):
    """The shards' buffers, put back together along their split axes, are the whole layer's;
    and each shard computes its slice (colwise) or its partial sum (rowwise)."""
    lin = _float_linear(64, 128)
    layer = config.layer_cls.from_float(lin, config)
    world = 2
    shards = [layer.shard(dim, r, world) for r in range(world)]
    whole_sd, parts_sd = layer.state_dict(), [s.state_dict() for s in shards]
    for name, axis in layer.shard_axes(dim).items():
        # state_dict: the canonical tensors (a CPU W8A8 layer keeps its weight in panels)
        whole = whole_sd.get(name)
        if whole is None:
            continue
        parts = [sd[name] for sd in parts_sd]
        if axis is None:
            assert all(torch.equal(p, whole) for p in parts), name
        else:
            assert torch.equal(torch.cat(parts, dim=axis), whole), name
    if dim == 1:
        for s in shards:
            s.bias = None  # RowParallel adds it once
    for m in (1, 3):  # the dynamic layers' two paths for given activation codes
        x = torch.randn(m, 128)
        y = layer(x)
        if dim == 0:
            assert_close_named(torch.cat([s(x) for s in shards], -1), y,
                               "tensor_parallel/float32")
            continue
        ks = 128 // world
        kw = {}
        if layer.quantizes_activation_rows:
            kw["act_amax"] = layer.act_row_amax(x)
        partial = [s(x[:, r * ks:(r + 1) * ks], **kw) for r, s in enumerate(shards)]
        assert_close_named(sum(partial) + layer.bias, y, "tensor_parallel/float32", f"M={m}")


def test_int4_shard_alignment_names_the_sizes():
    layer = pyquant.Int4WeightOnlyLinear.from_float(_float_linear(8, 192),
                                                    pyquant.Int4WeightOnly(group_size=64))
    assert layer.shard_alignment(1) == 64 and layer.shard_alignment(0) == 1
    assert layer.shard_sizes_ok(1, 3) is None
    why = layer.shard_sizes_ok(1, 2)
    assert "in_features=192 split 2 ways is 96 per shard" in why and "multiple of 64" in why
    with pytest.raises(ValueError, match="group_size=64"):
        layer.shard(1, 0, 2)


def test_check_lists_every_bad_layer_without_a_process_group():
    m = make_model("llama")
    pyquant.quantize_(m, pyquant.Int4WeightOnly(group_size=128))
    with pytest.raises(ValueError) as e:
        tp_plan.check(m, tp_plan.resolve(m, "auto"), 4)
    msg = str(e.value)
    # K=128 over 4 ranks: 32 per rank; kv heads 2 over 4 ranks
    assert "2 attention heads" in msg and "group_size=128" in msg
    assert msg.count("\n  ") >= 6


def test_check_takes_auto_and_dict_plans_and_dict_plans_keep_the_head_counts():
    """plan.check resolves "auto" and dict plans itself; a dict plan that cuts attention
    layers gets the head counts "auto" knows, so 1 KV head over 2 ranks fails in check(),
    not in the first forward's reshape."""
    m = make_model("llama", heads=2, kv_heads=1)
    qkvo = {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj":
            "colwise", "model.layers.*.self_attn.v_proj": "colwise",
            "model.layers.*.self_attn.o_proj": "rowwise"}
    for plan in ("auto", qkvo):
        with pytest.raises(ValueError, match=r"1 attention heads .* do not split 2 ways"):
            tp_plan.check(m, plan, 2)
    tp_plan.check(m, {"model.layers.*.mlp.down_proj": "rowwise"}, 2)  # no heads cut: fine


def test_save_refuses_a_sharded_model(tmp_path):
    """pyquant.save writes one unsharded checkpoint: a model holding one rank's shards is
    refused with what to do instead (it used to write that rank's half under .local keys)."""
    from pyquant.distributed.layers import ColumnParallel

    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    m[0] = ColumnParallel(torch.nn.Linear(8, 4), 8, 8, 0, 2, None)
    with pytest.raises(ValueError, match="tensor-parallel .* load_sharded"):
        pyquant.save(m, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_tensor_parallel_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        tp.tensor_parallel_(make_model("bert"))


def test_checkpoint_parts_are_read_as_byte_ranges(tmp_path):
    """io._read_tensor_parts returns exactly the slices, reading only their bytes."""
    from pyquant import io as pio

    class Counting:
        def __init__(self, f):
            self.f, self.read = f, 0

        def seek(self, pos):
            return self.f.seek(pos)

        def readinto(self, buf):
            n = self.f.readinto(buf)
            self.read += n
            return n

    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.randn(8, 6), requires_grad=False)
    model.register_buffer("b", torch.arange(4 * 6 * 10, dtype=torch.int16).reshape(4, 6, 10))
    path = str(tmp_path / "t.safetensors")
    pyquant.save(model, path)
    with open(path, "rb") as raw:
        entries, _, start = pio._read_header(raw, os.path.getsize(path), path)
        for key, axis, parts in (("a", 0, 2), ("a", 1, 3), ("b", 1, 2), ("b", 2, 5)):
            whole = getattr(model, key)
            for index in range(parts):
                f = Counting(raw)
                got = pio._read_tensor_parts(f, start, entries, {key: (axis, index, parts)},
                                             path)[key]
                step = whole.shape[axis] // parts
                assert torch.equal(got, whole.narrow(axis, index * step, step))
                assert f.read == got.numel() * got.element_size()
        with pytest.raises(ValueError, match="cannot take part 0 of 4 along axis 1"):
            pio._read_tensor_parts(raw, start, entries, {"a": (1, 0, 4)}, path)


def test_torchrun_demo_runs_and_splits_its_time(tmp_path):
    """The README's demo command, on a tiny model: it runs under torchrun (a free port:
    --standalone), and its split of the sharded forward counts the plan's collectives."""
    import json
    import subprocess
    import sys

    out = tmp_path / "demo.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), "-m", "pyquant.distributed.demo", "--compare", "--config", "int8_dynamic",
           "--hidden", "128", "--intermediate", "256", "--heads", "4", "--layers", "1",
           "--vocab", "256", "--tokens", "1,3", "--rounds", "2", "--iters", "2",
           "--checkpoint", str(tmp_path / "tiny.safetensors"), "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                       cwd=str(tmp_path), check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "collectives: 5 a forward" in p.stdout, p.stdout
    assert "of the whole model's speed" in p.stdout, p.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["m"] for r in rows] == [1, 3]
    for r in rows:  # 1 block: 2 row-parallel layers x (MAX of the row maxima, sum); lm_head
        assert r["comm"]["calls"] == 5
        assert 0 <= r["comm"]["after_last_arrival"] <= r["comm"]["inside"] < r["tp"]
        assert 0 < r["outside"] <= r["tp"]
        assert r["err"] < 1e-4  # the sharded logits equal the whole model's
        # the same collectives alone (both ranks ready) cost something, and bound the ratio
        assert 0 < r["alone"] < 60
    assert "the same collectives alone, both ranks ready" in p.stdout, p.stdout
    assert "could reach" in p.stdout, p.stdout


def test_collective_latency_benchmark_runs():
    """benchmarks/collective_latency.py (quoted in docs/distributed.md), with few repetitions:
    a row per collective, size and case, each a positive time, and the ratios to the socket."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "collective_latency.py"
    p = subprocess.run([sys.executable, str(script), "--reps", "3"], capture_output=True,
                       text=True, timeout=240, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith(("gloo ", "TCP "))
            and not ln.startswith("gloo all_gather /")]
    assert len(rows) == 11, p.stdout
    assert all(float(ln.split()[-1]) > 0 for ln in rows), p.stdout
    assert sum("/ TCP round trip" in ln for ln in p.stdout.splitlines()) == 2, p.stdout


@pytest.mark.parametrize("config", [pyquant.Sparse24(), pyquant.Sparse24Int8WeightOnly(),
                                    pyquant.Sparse24Int4WeightOnly(group_size=32)],
                         ids=["sparse24", "sparse24_int8", "sparse24_int4"])
@pytest.mark.parametrize("dim", [0, 1])
def test_sparse24_layer_shards_compute_their_part(config, dim):
    """The 2:4 layers (float, + int8, + int4) shard: a colwise shard computes its slice of the
    output, a rowwise shard its partial sum over its K slice (bias added once, outside)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_float_linear(64, 128))
    pyquant.sparsify_(model, config)
    layer = model[0]
    x = torch.randn(3, 128)
    shards = [layer.shard(dim, r, 2) for r in range(2)]
    with torch.no_grad():
        whole = layer(x)
        if dim == 0:
            got = torch.cat([s(x) for s in shards], dim=-1)
        else:
            got = sum(s(x.narrow(-1, 64 * r, 64)) - s.bias for r, s in enumerate(shards))
            got = got + layer.bias
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)


def test_sparse24_int4_shard_alignment_names_the_sizes():
    """A K shard of a 2:4 + int4 layer must hold whole groups of kept values (2G columns) and
    whole meta bytes: 128 columns split 2 ways at group size 64 is refused with the sizes."""
    model = torch.nn.Sequential(_float_linear(64, 128))
    pyquant.sparsify_(model, pyquant.Sparse24Int4WeightOnly(group_size=64))
    layer = model[0]
    assert layer.shard_sizes_ok(1, 1) is None and layer.shard_sizes_ok(0, 2) is None
    with pytest.raises(ValueError, match=r"in_features=128 split 2 ways is 64 per shard.*128"):
        layer.shard(1, 0, 2)


def test_demo_forward_computes_the_logits_generation_asks_for():
    """The demo times what generate() computes: the logits of the last token only
    (logits_to_keep=1), equal to the last row of the logits of every token, which
    --all-logits times instead."""
    from pyquant.distributed import demo

    model = make_model("llama")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last = demo._forward(model, ids)
        every = demo._forward(model, ids, all_logits=True)
    assert last.shape == (1, 1, 256) and every.shape == (1, 5, 256)
    torch.testing.assert_close(last[:, 0], every[:, -1], rtol=1e-5, atol=1e-5)
    assert demo._args(["--all-logits"]).all_logits and not demo._args([]).all_logits
