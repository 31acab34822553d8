"""Sharding plans: which linear layer is cut how, and the checks made before anything is cut.

A plan is {module fqn: style}; ``fnmatch`` patterns ("model.layers.*.mlp.down_proj") match
every linear layer whose name fits. Styles:

    colwise         out_features split; the output stays this rank's slice
    colwise_gather  out_features split; the slices are all-gathered (the last layer of a chain)
    rowwise         in_features split; the input is this rank's slice (or a whole input, cut
                    here), the partial sums are all-reduced and the bias added once
    replicate       left whole on every rank

``"auto"`` knows Hugging Face transformer blocks:

    Llama-style (Llama, Mistral, Qwen2, ...)  self_attn.{q,k,v}_proj colwise, o_proj rowwise;
                                              mlp.{gate,up}_proj colwise, down_proj rowwise
    BERT-style                                attention.self.{query,key,value} colwise,
                                              attention.output.dense rowwise;
                                              intermediate.dense colwise, output.dense rowwise
    lm_head (an nn.Linear named so)           colwise_gather

and divides the heads of each attention module over the ranks: q/k/v/o split at head
boundaries (the head counts must divide by the world size), and the module attributes that
count heads or their width (``num_heads``, ``num_attention_heads``, ``num_key_value_heads``,
``all_head_size``, ``hidden_size``, ``embed_dim``, where present) become this rank's share.
Transformers 5 reshapes with -1 heads, so its modules need no change; older ones do. The
model's ``config`` is shared by every module and is never changed.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn

from .layers import PARALLEL_TYPES, is_linear, is_pyquant_layer, is_shardable, shard_sizes_ok

STYLES = ("colwise", "colwise_gather", "rowwise", "replicate")
HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "all_head_size",
              "hidden_size", "embed_dim")
MAX_WORLD_HINT = 64  # world sizes tried when an error says which ones would work


@dataclass
class Plan:
    """A resolved plan: {fqn: style} of the layers to cut, the head count each attention layer's
    cut must respect, and the attention modules whose head attributes are divided."""

    layers: dict = field(default_factory=dict)  # fqn -> style (no "replicate")
    heads: dict = field(default_factory=dict)  # layer fqn -> (attention fqn, heads it holds)
    attention: dict = field(default_factory=dict)  # attention fqn -> {attr: whole value}


def _linear(m) -> bool:  # shardable or not: check() names the ones without shard rules
    return m is not None and is_linear(m)


def _head_counts(attn: nn.Module, q: nn.Module, head_dim: Optional[int]):
    cfg = getattr(attn, "config", None)
    nh = getattr(cfg, "num_attention_heads", None) or getattr(attn, "num_heads", None) \
        or getattr(attn, "num_attention_heads", None)
    nkv = getattr(cfg, "num_key_value_heads", None) or getattr(attn, "num_key_value_heads", None)
    if head_dim and not nh:
        nh = q.out_features // head_dim
    return nh, nkv or nh


def _head_attrs(attn: nn.Module) -> dict:
    return {a: getattr(attn, a) for a in HEAD_ATTRS
            if isinstance(getattr(attn, a, None), int) and not isinstance(getattr(attn, a), bool)}


def auto_plan(model: nn.Module) -> Plan:
    """The plan of ``"auto"`` for ``model`` (see the module doc)."""
    plan = Plan()
    for fqn, m in model.named_modules():
        if isinstance(m, PARALLEL_TYPES):
            raise ValueError(f"the model is already tensor-parallel ({fqn or '<root>'} is a "
                             f"{type(m).__name__}); shard a model only once")
        pre = f"{fqn}." if fqn else ""
        kids = {n: getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if all(_linear(c) for c in kids.values()):  # Llama-style attention
            nh, nkv = _head_counts(m, kids["q_proj"], getattr(m, "head_dim", None))
            for n, style, h in (("q_proj", "colwise", nh), ("k_proj", "colwise", nkv),
                                ("v_proj", "colwise", nkv), ("o_proj", "rowwise", nh)):
                plan.layers[pre + n] = style
                if h:
                    plan.heads[pre + n] = (fqn, h)
            plan.attention[fqn] = _head_attrs(m)
            continue
        mlp = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(_linear(c) for c in mlp):  # Llama-style gated MLP
            plan.layers.update({pre + "gate_proj": "colwise", pre + "up_proj": "colwise",
                                pre + "down_proj": "rowwise"})
            continue
        sa, out = getattr(m, "self", None), getattr(m, "output", None)
        qkv = [getattr(sa, n, None) for n in ("query", "key", "value")]
        if all(_linear(c) for c in qkv) and _linear(getattr(out, "dense", None)):
            nh = getattr(sa, "num_attention_heads", None)  # BERT-style attention
            for n in ("query", "key", "value"):
                plan.layers[f"{pre}self.{n}"] = "colwise"
                if nh:
                    plan.heads[f"{pre}self.{n}"] = (pre + "self", nh)
            plan.layers[pre + "output.dense"] = "rowwise"
            if nh:
                plan.heads[pre + "output.dense"] = (pre + "self", nh)
            plan.attention[pre + "self"] = _head_attrs(sa)
            continue
        inter = getattr(m, "intermediate", None)
        if _linear(getattr(inter, "dense", None)) and _linear(getattr(out, "dense", None)):
            plan.layers.update({pre + "intermediate.dense": "colwise",  # BERT-style MLP
                                pre + "output.dense": "rowwise"})
    if not plan.layers:
        raise ValueError(
            f"plan='auto' found no Llama-style (q_proj/k_proj/v_proj/o_proj, gate_proj/up_proj/"
            f"down_proj) or BERT-style (attention.self.query/key/value, intermediate.dense) "
            f"blocks in {type(model).__name__}; pass a dict plan {{module fqn: style}}")
    head = getattr(model, "lm_head", None)
    if is_linear(head):
        plan.layers["lm_head"] = "colwise_gather"
    return plan


def dict_plan(model: nn.Module, plan: dict) -> Plan:
    """A Plan from {fqn or fnmatch pattern: style}; every key must name a linear layer."""
    linears = {fqn: m for fqn, m in model.named_modules() if is_linear(m)}
    out, problems = Plan(), []
    for key, style in plan.items():
        if style not in STYLES:
            problems.append(f"{key!r}: unknown style {style!r}; use one of {', '.join(STYLES)}")
            continue
        if any(c in key for c in "*?["):
            names = [f for f in linears if fnmatch.fnmatchcase(f, key)]
            if not names:
                problems.append(f"pattern {key!r} matches no linear layer")
        else:
            names = [key]
            if key not in linears:
                try:
                    m = model.get_submodule(key)
                except AttributeError:
                    problems.append(f"{key!r}: no such module in {type(model).__name__}")
                    continue
                problems.append(f"{key!r} is a {type(m).__name__}; only nn.Linear and pyquant "
                                "layers can be sharded")
                continue
        for f in names:
            if style == "replicate":
                out.layers.pop(f, None)
            else:
                out.layers[f] = style
    if problems:
        raise ValueError("tensor-parallel plan: " + "; ".join(problems))
    # the head counts that "auto" knows hold for the same layers in a dict plan: a cut
    # inside a head must fail in check(), not in the first forward's reshape
    try:
        auto = auto_plan(model)
    except ValueError:  # no block "auto" knows (or already sharded: check() says so)
        auto = None
    if auto is not None:
        for f in out.layers:
            if f in auto.heads:
                out.heads[f] = auto.heads[f]
                attn = auto.heads[f][0]
                out.attention[attn] = auto.attention.get(attn, {})
    return out


def resolve(model: nn.Module, plan: Union[str, dict, Plan]) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"plan={plan!r}: use 'auto' or a dict {{module fqn: style}} with "
                             f"styles {', '.join(STYLES)}")
        return auto_plan(model)
    if isinstance(plan, dict):
        return dict_plan(model, plan)
    raise TypeError(f"plan must be 'auto', a dict or a Plan, got {type(plan).__name__}")


def _layer_problem(m, fqn, style, heads, world) -> Optional[str]:
    dim = 1 if style == "rowwise" else 0
    why = shard_sizes_ok(m, dim, world)
    if why:
        return why
    if heads is not None:
        attn, h = heads
        if h % world:
            return f"{h} attention heads (of {attn or '<root>'}) do not split {world} ways"
    return None


def _describe(m) -> str:
    if is_pyquant_layer(m):
        return f"{type(m).__name__}({m._scheme_repr()})"
    return type(m).__name__


def check(model: nn.Module, plan: Union[str, dict, Plan], world: int) -> None:
    """Raise one ValueError naming every layer of ``plan`` ("auto", a dict or a Plan) that
    cannot be cut ``world`` ways, its sizes, and the world sizes that would work. Touches
    nothing, calls no collective."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size {world!r} must be an int >= 1")
    plan = resolve(model, plan)
    lines, works_for_all = [], set(range(1, MAX_WORLD_HINT + 1))
    for fqn, style in plan.layers.items():
        try:
            m = model.get_submodule(fqn)
        except AttributeError:
            lines.append(f"{fqn}: no such module")
            continue
        if not is_shardable(m):
            what = ("has no shard rules (shard_axes) yet" if is_pyquant_layer(m)
                    else "is not a linear layer")
            lines.append(f"{fqn}: {type(m).__name__} {what}; only nn.Linear and pyquant layers "
                         "with shard rules can be sharded (replicate it with a dict plan)")
            works_for_all = set()
            continue
        heads = plan.heads.get(fqn)
        ok = {w for w in works_for_all if _layer_problem(m, fqn, style, heads, w) is None}
        works_for_all &= ok
        why = _layer_problem(m, fqn, style, heads, world)
        if why:
            good = ", ".join(map(str, sorted(ok))) or "none"
            lines.append(f"{fqn} ({_describe(m)}, {style}): {why}; world sizes that work for "
                         f"this layer: {good}")
    for attn, attrs in plan.attention.items():
        for a, v in attrs.items():
            works_for_all = {w for w in works_for_all if v % w == 0}
            if v % world:
                lines.append(f"{attn or '<root>'}.{a}={v} does not split {world} ways")
    if lines:
        good = ", ".join(map(str, sorted(works_for_all))) or "none"
        raise ValueError(
            f"tensor parallelism over world_size={world} is impossible for this plan (nothing "
            "was cut):\n  " + "\n  ".join(lines)
            + f"\nworld sizes (up to {MAX_WORLD_HINT}) that work for every layer: {good}")
