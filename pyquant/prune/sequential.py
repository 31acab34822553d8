"""A generic block-by-block runner over calibration data (any statistic, any per-layer action).

    run_sequential(model, linears, calibration, make_stat, finish, desc="wanda")

1. The repeated blocks are found as ``pyquant.calibrate.sequential.find_blocks`` finds them
   (the largest ``nn.ModuleList`` of same-type modules holding target Linear layers) and a float
   pass checks that they are chained (each called once per batch on the previous one's output);
   otherwise the whole model is one unit.
2. A forward pre-hook on block 0 records its inputs and raises to stop the forward.
3. Block by block: hooks feed every target Linear's inputs (padding tokens dropped when the batch
   has a 2-D ``attention_mask``) to ``make_stat(linear)``'s ``add(x_rows_float32)``; the block
   runs on every batch; ``finish(linear, stat)`` is called for each of its targets (pruning it in
   place, e.g.); the block runs again to produce the inputs of the next block, so every block
   sees the outputs of the already-processed blocks (sequential calibration, as in the SparseGPT
   and Wanda reference code).
4. Targets outside the blocks get one pass over the whole model.
5. With ``measure`` (an ``Errors``), ``finish`` returns the layer it swapped in, and the run
   measures what the swap cost on the same data, as ``quantize_``'s calibrated path does: each
   new layer's output against the float layer's on the same inputs (during the block's second
   run; outside the blocks, during one more pass over the model), and the model's main output
   against the float model's (kept from the first, float pass).

Memory: one block's inputs for every batch plus one block's statistics. Batch handling, block
discovery and the hidden-state plumbing are the ones of pyquant.calibrate.sequential (shared,
not copied).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .._progress import progress
from ..calibrate import sequential as _seq


class Errors:
    """What step 5 measures: ``layers`` {id(float layer): its output error (an ``_OutErr``)}
    and ``model`` (a ``ModelAccuracy``, or None when no output could be compared)."""

    def __init__(self):
        self.layers: dict = {}
        self.model = None


def run_sequential(model: nn.Module, linears: list, calibration: Iterable[Any],
                   make_stat: Callable[[nn.Module], Any],
                   finish: Callable[[nn.Module, Any], Optional[nn.Module]],
                   desc: str = "calibrate", measure: Optional[Errors] = None) -> dict:
    """Run the steps above; returns {"batches", "blocks", "num_blocks", "fallback"?}."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = _seq.prepare_batches(calibration, device, model)
    uniq = list({id(m): m for m in linears}.values())
    ids = {id(m) for m in uniq}
    blocks_name, blocks = _seq.find_blocks(model, ids)
    info = {"batches": len(batches), "blocks": blocks_name, "num_blocks": len(blocks)}
    state = {"mask": None, "swapped": 0}
    handles: list = []

    def call(i, b):
        state["mask"] = b.mask
        return _seq.call_on_batch(model, i, b, state["swapped"])

    def collect(members):
        stats = {}
        for m in members:
            st = stats[id(m)] = make_stat(m)

            def hook(mod, args, out, st=st):
                x = args[0] if args else None
                if isinstance(x, torch.Tensor):
                    st.add(_seq._rows(x.detach(), state["mask"]))
            handles.append(m.register_forward_hook(hook))
        return stats

    def unhook():
        for h in handles:
            h.remove()
        handles.clear()

    refs = _seq.RefOutputs() if measure is not None else None

    def first_pass(i, b):
        """A pass of the float model; the first one's outputs are the references of step 5."""
        out = call(i, b)
        if refs is not None and not state.get("refs_done"):
            refs.add(out)

    def finish_all(members, stats):
        for m in members:
            new = finish(m, stats.pop(id(m)))
            state["swapped"] += 1
            if measure is not None and new is not None:
                e = measure.layers[id(m)] = _seq._OutErr(m.weight, m.bias)
                handles.append(new.register_forward_hook(e.hook(lambda: state["mask"])))

    was_training = model.training
    hf_config = getattr(model, "config", None)
    old_use_cache = getattr(hf_config, "use_cache", None)
    chain = None
    try:
        model.eval()
        if isinstance(old_use_cache, bool):
            hf_config.use_cache = False
        with torch.no_grad():
            done: set = set()
            if blocks:
                # calibrate's chain check, with no outside layers to track
                chain = _seq._ChainCheck(blocks, {})
                for i, b in enumerate(batches):
                    first_pass(i, b)
                    chain.last_out = None
                state["refs_done"] = True
                why = chain.reason(len(batches))
                chain.remove()
                if why:
                    info["fallback"] = f"the blocks of {blocks_name!r} not used ({why})"
                    blocks_name, blocks = None, []
                    info["blocks"], info["num_blocks"] = None, 0
            if blocks:
                captured = []

                def stop(mod, args, kwargs):
                    captured.append((args, _seq._sanitize(kwargs)))
                    raise _seq._StopForward

                h = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
                try:
                    for i, b in enumerate(batches):
                        try:
                            call(i, b)
                        except _seq._StopForward:
                            pass
                finally:
                    h.remove()
                if len(captured) != len(batches):
                    raise ValueError(f"calibration: block {blocks_name}.0 was not reached by "
                                     "every batch")
                loc = _seq._hidden_loc(*captured[0])
                inputs = captured
                del captured
                for block in progress(blocks, desc=f"{desc}: blocks"):
                    sub = {id(s) for s in block.modules()}
                    members = [m for m in uniq if id(m) in sub]

                    def run(i, block=block):
                        args, kwargs = inputs[i]
                        state["mask"] = batches[i].mask
                        return _seq._first_tensor(block(*args, **kwargs))

                    if members:
                        stats = collect(members)
                        for i in range(len(inputs)):
                            run(i)
                        unhook()
                        finish_all(members, stats)
                        done.update(id(m) for m in members)
                        del stats
                    outs = [run(i) for i in range(len(inputs))]
                    unhook()
                    inputs = [_seq._set_hidden(loc, a, kw, o)
                              for (a, kw), o in zip(inputs, outs)]
                    del outs
                del inputs
            left = [m for m in uniq if id(m) not in done]
            if left:
                stats = collect(left)
                for i, b in enumerate(batches):
                    first_pass(i, b)
                unhook()
                finish_all(left, stats)
            if measure is not None:
                # the swapped model's outputs for the model-level error, and every batch while
                # the layers outside the blocks still measure theirs
                n = len(batches) if left else len(refs.outs)
                outs = []
                for i in range(n):
                    out = _seq._main_output(call(i, batches[i]))[0]
                    if i < len(refs.outs):
                        outs.append(out)
                    del out
                unhook()
                if refs.outs:
                    measure.model = _seq._model_accuracy(
                        refs.outs, outs, [b.mask for b in batches[:len(refs.outs)]], refs.what)
    finally:
        unhook()
        if chain is not None:
            chain.remove()
        if isinstance(old_use_cache, bool):
            hf_config.use_cache = old_use_cache
        model.train(was_training)
    return info
