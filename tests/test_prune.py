"""pyquant.prune: masks have the requested pattern, the methods rank weights as their papers
say, SparseGPT's updates are right, the sequential runner feeds each block the pruned outputs
of the blocks before it, and on synthetic layers with real-looking statistics Wanda and
SparseGPT beat magnitude in output error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import gen
from pyquant import models
from pyquant.prune import (magnitude_mask, mask_from_scores, run_sequential, sparsegpt_prune,
                           wanda_mask)
from pyquant.sparse_formats import nm_mask_ok, unstructured_kept

PATTERNS = [(0.5, None), (0.3, None), (0.9, None), (None, (2, 4)), (None, (4, 8)),
            (None, (1, 4))]


def _ids(p):
    return f"{p[1][0]}of{p[1][1]}" if p[1] else f"unstructured{p[0]}"


def check_pattern(mask, sparsity, nm):
    n, k = mask.shape
    if nm is not None:
        assert nm_mask_ok(mask, *nm), "every group of m must keep exactly n"
    else:
        kept = mask.sum(1)
        assert bool((kept == unstructured_kept(k, sparsity)).all()), kept


@pytest.mark.parametrize("pattern", PATTERNS, ids=_ids)
@pytest.mark.parametrize("n,k", [(13, 104), (32, 256), (1, 8)])
def test_masks_have_the_pattern(pattern, n, k):
    sparsity, nm = pattern
    w = torch.randn(n, k, generator=gen(n + k))
    act = torch.rand(k, generator=gen(1)) * 10
    for mask in (magnitude_mask(w, sparsity, nm), wanda_mask(w, act, sparsity, nm)):
        assert mask.dtype == torch.bool and mask.shape == (n, k)
        check_pattern(mask, sparsity, nm)
    h = _hessian(torch.randn(4 * k, k, generator=gen(2)))
    new, mask = sparsegpt_prune(w, h, sparsity, nm, block_size=32)
    check_pattern(mask, sparsity, nm)
    assert bool((new[~mask] == 0).all())


def test_magnitude_keeps_the_largest():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 0.3]])
    assert magnitude_mask(w, None, (2, 4)).tolist() == [[False, True, True, False,
                                                         True, False, False, True]]
    assert magnitude_mask(w, 0.5).tolist() == [[True, True, True, True,
                                                False, False, False, False]]
    # ties: still exactly the pattern; unstructured keeps the lower columns
    assert nm_mask_ok(mask_from_scores(torch.ones(3, 8), None, (2, 4)), 2, 4)
    assert mask_from_scores(torch.ones(1, 4), 0.5).tolist() == [[True, True, False, False]]


def test_wanda_uses_activation_norms():
    """Equal weights: Wanda keeps the inputs with the largest ||X_j||; with uniform norms it
    is magnitude pruning."""
    w = torch.randn(16, 64, generator=gen(0))
    act = torch.ones(64)
    assert torch.equal(wanda_mask(w, act, 0.5), magnitude_mask(w, 0.5))
    assert torch.equal(wanda_mask(w, act, None, (2, 4)), magnitude_mask(w, None, (2, 4)))
    big = torch.ones(64)
    big[::4] = 1e6  # column 0 of every group dominates
    mask = wanda_mask(torch.ones(4, 64), big, None, (2, 4))
    assert bool(mask[:, ::4].all())


def _hessian(x):
    return x.T @ x


def test_sparsegpt_with_identity_hessian_is_magnitude():
    """H = I: no correlations, so no weight moves and the N:M mask is magnitude's."""
    w = torch.randn(24, 64, generator=gen(3))
    new, mask = sparsegpt_prune(w, torch.eye(64), None, (2, 4))
    assert torch.equal(mask, magnitude_mask(w, None, (2, 4)))
    torch.testing.assert_close(new, w * mask, rtol=0, atol=1e-6)


def test_sparsegpt_on_calibration_inputs_that_are_all_zero_is_magnitude():
    """Every input 0 on every calibration token (H = 0): the weights compete by magnitude, as
    with no data. The reference code's W[:, dead] = 0 used to return an all-zero layer."""
    w = torch.randn(24, 64, generator=gen(4))
    new, mask = sparsegpt_prune(w, torch.zeros(64, 64), None, (2, 4))
    assert torch.equal(mask, magnitude_mask(w, None, (2, 4)))
    torch.testing.assert_close(new, w * mask, rtol=0, atol=1e-6)


def test_sparsegpt_validation():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"hessian must be \[8, 8\]"):
        sparsegpt_prune(w, torch.eye(7))
    with pytest.raises(ValueError, match=r"2:4 pattern needs K a multiple of 4, got K=6"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), None, (2, 4))
    with pytest.raises(ValueError, match=r"NaN or inf"):
        sparsegpt_prune(w, torch.full((8, 8), float("nan")))
    # a dead input (always 0) costs nothing on the data: its weights go first, no NaN
    h = _hessian(torch.randn(64, 8, generator=gen(1)))
    h[3, :] = 0
    h[:, 3] = 0
    new, mask = sparsegpt_prune(w, h, 0.5)
    assert bool(torch.isfinite(new).all()) and bool((new[:, 3] == 0).all())


# ------------------------------------------------------------------- accuracy, synthetic


def realistic_inputs(tokens, k, seed=0, n_outliers=4, factor=30.0):
    """Correlated activations (a random low-rank mixing plus noise, like hidden states) with a
    few outlier channels whose magnitude is ``factor`` times the rest (as in LLMs)."""
    g = gen(seed)
    z = torch.randn(tokens, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g) / (k // 4) ** 0.5
    x = z @ mix + 0.3 * torch.randn(tokens, k, generator=g)
    cols = torch.randperm(k, generator=g)[:n_outliers]
    x[:, cols] *= factor
    return x


def output_error(x, w, w_pruned):
    ref = x @ w.T
    return float((x @ w_pruned.T - ref).norm() / ref.norm())


@pytest.mark.parametrize("pattern", [(0.5, None), (None, (2, 4))], ids=["50%", "2:4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_wanda_and_sparsegpt_beat_magnitude(pattern, seed):
    sparsity, nm = pattern
    n, k = 96, 256
    w = torch.randn(n, k, generator=gen(100 + seed))
    x_all = realistic_inputs(3072, k, seed)
    x_cal, x_test = x_all[:2048], x_all[2048:]  # same distribution, held-out tokens
    err = {
        "magnitude": output_error(x_test, w, w * magnitude_mask(w, sparsity, nm)),
        "wanda": output_error(x_test, w, w * wanda_mask(w, x_cal.pow(2).sum(0), sparsity, nm)),
        "sparsegpt": output_error(x_test, w, sparsegpt_prune(w, _hessian(x_cal), sparsity, nm)[0]),
    }
    print(f"\npattern {pattern}, seed {seed}: relative output error {err}")
    assert err["wanda"] < 0.8 * err["magnitude"], err
    assert err["sparsegpt"] < 0.8 * err["magnitude"], err
    assert err["sparsegpt"] < err["wanda"], err


# ------------------------------------------------------------------- the sequential runner


class _Record:
    def __init__(self):
        self.rows = []
        self.tokens = 0

    def add(self, x):
        self.rows.append(x.clone())
        self.tokens += x.shape[0]


def test_sequential_sees_pruned_outputs():
    """Block 1's statistics must come from block 0 *after* block 0 was processed: zero every
    weight of block 0 in finish, and block 1's recorded inputs are those of the model whose
    block 0 is zeroed, run normally."""
    model = models.tiny_model(seed=0)
    batches = models.tiny_inputs(6, batch_size=3, seed=1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    block0 = {id(m) for m in model.blocks[0].modules()}
    stats = {}
    order = []

    def make_stat(m):
        stats[id(m)] = _Record()
        return stats[id(m)]

    def finish(m, st):
        order.append(id(m))
        if id(m) in block0:
            m.weight.data.mul_(0.5)

    info = run_sequential(model, linears, batches, make_stat, finish, desc="test")
    assert info["blocks"] == "blocks" and info["num_blocks"] == 2 and info["batches"] == 2
    assert sorted(order) == sorted(id(m) for m in linears) and len(order) == len(linears)
    # the reference: the (now halved) model run normally, inputs of block 1's query layer
    seen = []
    h = model.blocks[1].query.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][batches_mask[0]].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            batches_mask = [b["attention_mask"].bool()]
            model(**b)
    h.remove()
    got = torch.cat(stats[id(model.blocks[1].query)].rows)
    torch.testing.assert_close(got, torch.cat(seen), rtol=1e-5, atol=1e-5)
    # padding tokens are not in the statistics
    assert got.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)


def test_sequential_without_blocks():
    """A model with no repeated blocks: every layer in one pass over the model."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    got = {}

    def finish(m, st):
        got[id(m)] = st.tokens

    info = run_sequential(model, [model[0], model[2]], [torch.randn(5, 8), torch.randn(3, 8)],
                          lambda m: _Record(), finish)
    assert info["num_blocks"] == 0 and set(got.values()) == {8}


def test_sequential_positional_mask():
    """(input_ids, attention_mask) tuples: padding is left out as with the dict form."""
    model = models.tiny_model(seed=0)
    batches = models.tiny_inputs(6, batch_size=3, seed=1)
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    got = {}

    def finish(m, st):
        got[id(m)] = st.tokens

    run_sequential(model, linears, [(b["input_ids"], b["attention_mask"]) for b in batches],
                   lambda m: _Record(), finish)
    assert set(got.values()) == {sum(int(b["attention_mask"].sum()) for b in batches)}
