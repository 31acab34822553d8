"""Tensor-parallel demo: a quantized Llama-style model sharded over the ranks of torchrun.

    torchrun --nproc-per-node 2 -m pyquant.distributed.demo             # this machine
    torchrun --nproc-per-node 2 -m pyquant.distributed.demo --compare   # + 1 rank x 2 threads
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST0:29500 -m pyquant.distributed.demo  # 2 hosts

1. The first rank of each host builds a random Llama-style model (hidden 4096, 2 blocks by
   default), quantizes it and ``pyquant.save``s it: one checkpoint of the whole model.
2. Every rank builds a skeleton on the meta device (no memory) and ``load_sharded`` reads only
   its slices of the checkpoint: the linear layers' bytes per rank are printed.
3. Each rank runs forwards of M tokens (gloo on CPU, 1 thread a rank; NCCL on GPUs), with the
   logits of the last token as ``generate()`` computes them (``--all-logits``: of every
   token), and the time per forward is printed: the median over rounds of the slowest rank, split into the
   time inside the wrappers' collectives (``record_collectives``) and the time outside them.
4. ``--compare`` (one host): rank 0 also runs the whole quantized model with all the threads
   of the ranks together (1 rank x N threads) while the others wait, in alternating rounds, so
   the cost of sharding (all-reduces, smaller matrices) is a ratio measured in one run.
5. For every M the collectives of one forward are replayed alone, right after a barrier (both
   ranks ready): what the transport costs at the least; with --compare, the best ratio the
   sharded model could reach if its layers ran as fast as the whole model's.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from .layers import record_collectives, replay_collective

CONFIGS = ("int4_weight_only", "int8_weight_only", "int8_dynamic", "int4_dynamic", "float")


def _args(argv=None):
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m pyquant.distributed.demo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=CONFIGS, default="int4_weight_only")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", default="1,64", help="tokens per forward (M), comma-separated")
    p.add_argument("--iters", type=int, default=0,
                   help="forwards per round (default: about 0.5 s of work)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; medians are printed")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (CPU)")
    p.add_argument("--compare", action="store_true",
                   help="also time 1 rank x (ranks x threads) threads on the whole model")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint path (kept; reused if it exists). Default: a temporary "
                        "file on each host, removed at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-logits", action="store_true",
                   help="compute the logits of every token, not only of the last one as "
                        "generate() does")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    return p.parse_args(argv)


def _llama_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads,
                       num_hidden_layers=a.layers, vocab_size=a.vocab,
                       max_position_embeddings=max(4096, 2 * max(_ms(a))))


def _ms(a) -> list:
    return [int(v) for v in str(a.tokens).split(",") if v.strip()]


def _quant_config(a):
    import pyquant

    return {"int4_weight_only": lambda: pyquant.Int4WeightOnly(group_size=a.group_size),
            "int8_weight_only": pyquant.Int8WeightOnly, "int8_dynamic": pyquant.Int8Dynamic,
            "int4_dynamic": lambda: pyquant.Int4Dynamic(group_size=a.group_size),
            "float": lambda: None}[a.config]()


def _skeleton_cls():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def _skeleton(config, device):
    """The model on the meta device (no memory), but for the rotary embedding's
    non-persistent buffer, which no checkpoint holds: that one is built for real."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()


def _build_and_save(a, config, path):
    """Whole float model -> quantized -> one checkpoint. Returns the quantized model."""
    import pyquant
    from transformers import LlamaForCausalLM

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(config).eval()
    qc = _quant_config(a)
    if qc is not None:
        pyquant.quantize_(model, qc)
    pyquant.save(model, path)
    return model, time.perf_counter() - t0


def _forward(model, ids, all_logits=False):
    """The logits of the last token, as ``generate()`` asks for them in prefill and decode
    (``logits_to_keep=1``: the vocabulary projection of the other M - 1 tokens is never used
    there), or of every token with ``all_logits``. With a column-parallel lm_head that is
    also the size of its all_gather: at M = 64 all the logits are 4 MiB a rank (6.6 ms in
    gloo on a 2-core VM, more than the four 1 MiB all-reduces of two blocks together)."""
    if all_logits or not _keeps_logits(type(model)):
        return model(input_ids=ids, use_cache=False).logits
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


@functools.lru_cache(maxsize=None)
def _keeps_logits(cls) -> bool:
    """Whether the model class takes logits_to_keep (read once a class: inspect.signature
    costs tens of microseconds, and _forward is what the demo times)."""
    import inspect

    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _time(model, ids, iters, sync, all_logits) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        _forward(model, ids, all_logits)
    sync()
    return (time.perf_counter() - t0) / iters


def _collective_times(calls, forwards, one_host) -> dict:
    """Per forward, from every rank's log of one round: how many collectives the wrappers
    issued and the seconds inside them (mean over the ranks); on one host (one clock) also
    the part of that spent after the last rank arrived (the collective itself, not the
    wait for a slower rank)."""
    logs = [None] * dist.get_world_size()
    dist.all_gather_object(logs, calls)
    out = {"calls": len(calls) / forwards,
           "inside": statistics.fmean(sum(t1 - t0 for *_, t0, t1 in log) for log in logs)
           / forwards}
    if one_host and all(len(log) == len(calls) for log in logs):
        out["after_last_arrival"] = sum(
            max(0.0, min(c[3] for c in same) - max(c[2] for c in same))
            for same in zip(*logs)) / forwards
    return out


def _collectives_alone(calls, repeats=20) -> float:
    """Seconds a forward's collectives (``calls``: (name, numel) of one forward) take alone:
    each replayed ``repeats`` times right after a barrier, so both ranks are ready and idle;
    the sum of the medians, the slowest rank's. What the transport costs at the least, with no
    rank arriving late and no work around it."""
    total = 0.0
    for name, numel in calls:
        ts = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            replay_collective(name, numel)
            ts.append(time.perf_counter() - t0)
        total += statistics.median(ts)
    t = torch.tensor([total])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _fmt_mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _measure(a, model, whole, device, cuda, rank, world, one_host) -> list:
    """Per M: the sharded model's time per forward (slowest rank), and with --compare the whole
    model's on rank 0 with all the ranks' threads, in alternating rounds (others idle)."""
    sync = (lambda: (torch.cuda.synchronize(), dist.barrier())) if cuda else dist.barrier
    local_sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(1)
    rows = []
    with torch.inference_mode():
        for m in _ms(a):
            ids = torch.randint(0, a.vocab, (1, m), generator=g).to(device)
            y_tp = _forward(model, ids, a.all_logits)  # warm-up, and the output compared below
            t1 = torch.tensor([_time(model, ids, 1, sync, a.all_logits)])
            dist.all_reduce(t1, op=dist.ReduceOp.MAX)
            iters = a.iters or max(1, min(50, int(0.5 / max(t1.item(), 1e-6))))
            row = {"m": m, "iters": iters, "tp_all": [], "base_all": [], "comm_all": []}
            if a.compare and rank == 0:
                torch.set_num_threads(a.threads * world)
                y_whole = _forward(whole, ids, a.all_logits)
                torch.set_num_threads(a.threads)
                row["err"] = ((y_tp - y_whole).abs().max() / y_whole.abs().max()).item()
            for r in range(a.rounds):
                for which in (("tp", "base") if r % 2 == 0 else ("base", "tp")):
                    if which == "tp":
                        with record_collectives() as log:
                            t = torch.tensor([_time(model, ids, iters, sync, a.all_logits)])
                        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
                        row["tp_all"].append(t.item())
                        row["comm_all"].append(_collective_times(log.calls, iters, one_host))
                        one_forward = [c[:2] for c in log.calls[:len(log.calls) // iters]]
                    elif a.compare:
                        dist.barrier()
                        if rank == 0:
                            torch.set_num_threads(a.threads * world)
                            row["base_all"].append(_time(whole, ids, iters, local_sync,
                                                         a.all_logits))
                            torch.set_num_threads(a.threads)
                        dist.barrier()  # the other ranks wait here (idle: gloo does not spin)
            row["tp"] = statistics.median(row["tp_all"])
            if not cuda:
                row["alone"] = _collectives_alone(one_forward)
            row["comm"] = {k: statistics.median(c[k] for c in row["comm_all"])
                           for k in row["comm_all"][0]}
            # the sharded forward's time outside the collectives, per round (slowest rank)
            row["outside"] = statistics.median(
                t - c["inside"] for t, c in zip(row["tp_all"], row["comm_all"]))
            if row["base_all"]:
                row["base"] = statistics.median(row["base_all"])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    a = _args(argv)
    if "RANK" not in os.environ:
        print("run me under torchrun, e.g.\n  torchrun --nproc-per-node 2 -m "
              "pyquant.distributed.demo" + "".join(" " + x for x in (argv or sys.argv[1:])),
              file=sys.stderr)
        return 2
    import pyquant
    import pyquant.distributed as tp

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    torch.set_num_threads(a.threads)
    say = print if rank == 0 else (lambda *x, **k: None)
    one_host = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    if a.compare and not one_host:
        say("--compare needs all ranks on one host; ignored")
        a.compare = False

    config = _llama_config(a)
    path = a.checkpoint or os.path.join(
        tempfile.gettempdir(),
        f"pyquant-tp-demo-{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}-"
        f"{os.environ.get('MASTER_PORT', '0')}.safetensors")
    whole = None
    say(f"pyquant {pyquant.__version__} tensor-parallel demo: {world} ranks "
        f"({dist.get_backend()}, {'CUDA' if cuda else f'{a.threads} CPU thread(s) a rank'}), "
        f"Llama-style hidden={a.hidden} intermediate={a.intermediate} heads={a.heads} "
        f"layers={a.layers} vocab={a.vocab}, {a.config}"
        + (f" group_size={a.group_size}" if a.config.startswith("int4") else "")
        + (", logits of every token" if a.all_logits or not _keeps_logits(_skeleton_cls())
           else ", logits of the last token (as generate())"))
    if local_rank == 0 and not (a.checkpoint and os.path.exists(path)):
        whole, secs = _build_and_save(a, config, path)
        say(f"built, quantized and saved the whole model in {secs:.1f} s: {path} "
            f"({_fmt_mib(os.path.getsize(path))})")
    dist.barrier()
    try:
        model = _skeleton(config, device)
        t0 = time.perf_counter()
        report = tp.load_sharded(model, path, device=device)
        load_s = time.perf_counter() - t0
        if a.compare and rank == 0 and whole is None:
            whole = pyquant.load(_skeleton(config, device), path)
        if whole is not None:
            whole = whole.to(device) if a.compare else None
        dist.barrier()
    finally:
        if local_rank == 0 and not a.checkpoint:
            with contextlib.suppress(OSError):
                os.unlink(path)
    lines = [None] * world
    dist.all_gather_object(lines, (
        f"rank {rank}: linear weights {_fmt_mib(report.bytes_after)} of "
        f"{_fmt_mib(report.bytes_before)} ({report.bytes_after / report.bytes_before:.1%}), "
        f"{len(report.layers)} layers sharded, loaded its slices in {load_s:.2f} s"))
    for line in lines:
        say("  " + line)

    rows = _measure(a, model, whole, device, cuda, rank, world, one_host)
    whole_label = "1 GPU" if cuda else f"1 rank x {a.threads * world} thr"
    tp_label = f"{world} GPUs" if cuda else f"{world} ranks x {a.threads} thr"
    say(f"\nms per forward of M tokens: median of {a.rounds} rounds (the slowest rank's time)")
    # the linear weights every forward reads, over the time: effective weight bandwidth
    gbs = lambda t: report.bytes_before / t / 1e9  # noqa: E731
    hdr = f"{'M':>5} {'iters':>5} {tp_label:>18} {'tokens/s':>10} {'weight GB/s':>11}"
    if a.compare:
        hdr += (f" {whole_label + ' (GB/s)':>27} {'sharded/whole speed':>20} "
                f"{'max|diff|/max|y|':>17}")
    say(hdr)
    for row in rows:
        line = (f"{row['m']:>5} {row['iters']:>5} {row['tp'] * 1e3:>15.2f} ms "
                f"{row['m'] / row['tp']:>10.1f} {gbs(row['tp']):>11.2f}")
        if "base" in row:
            line += (f" {row['base'] * 1e3:>13.2f} ms ({gbs(row['base']):5.2f}) "
                     f"{row['base'] / row['tp']:>20.1%} "
                     f"{row['err']:>17.2e}")
        say(line)
        say(f"{'':>11} each round: {' '.join(f'{t * 1e3:.1f}' for t in row['tp_all'])}"
            + (f" | whole: {' '.join(f'{t * 1e3:.1f}' for t in row['base_all'])}"
               if "base" in row else ""))
        c = row["comm"]
        line = (f"{'':>11} collectives: {c['calls']:.0f} a forward, {c['inside'] * 1e3:.2f} ms "
                f"a forward inside them (mean of the ranks)")
        if "after_last_arrival" in c:
            line += (f", {c['after_last_arrival'] * 1e3:.2f} ms of it after the last rank "
                     f"arrived, the rest waiting for a slower rank")
        say(line)
        line = f"{'':>11} outside the collectives: {row['outside'] * 1e3:.2f} ms"
        if "base" in row:
            line += f", {row['base'] / row['outside']:.1%} of the whole model's speed"
        say(line)
        if "alone" in row:
            line = (f"{'':>11} the same collectives alone, both ranks ready: "
                    f"{row['alone'] * 1e3:.2f} ms a forward")
            if "base" in row:
                # the best sharding can do on this transport: the layers as fast as the whole
                # model's, and every collective at its cost between idle, ready ranks
                line += (f"; with the rest as fast as the whole model, sharded/whole could "
                         f"reach {row['base'] / (row['base'] + row['alone']):.1%} at most")
            say(line)
    if a.json and rank == 0:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "world": world, "backend": dist.get_backend(),
                       "linear_bytes_per_rank": report.bytes_after,
                       "linear_bytes_whole": report.bytes_before, "rows": rows}, f, indent=1)
    # The models go while the process group is still alive: freed after destroy_process_group
    # (when main returns), a rank aborted in 2 of 10 runs of the test's tiny demo ("terminate
    # called without an active exception", torch 2.13, gloo); freed here, none in 40.
    del model, whole
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
