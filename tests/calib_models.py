"""Small float models and data shared by the calibration tests (test_calibrate.py,
test_gptq.py, test_awq_smoothquant.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int, k: int, seed: int = 0, decay: float = 0.9) -> torch.Tensor:
    """[n, k] rows with strongly correlated features: z @ M, M with singular values decaying
    geometrically (what real activations look like to GPTQ: a few directions dominate). M
    depends on k only, so every seed draws from the same distribution (held-out data)."""
    gm = gen(10_000 + k)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gm))
    sv = decay ** torch.arange(k, dtype=torch.float32) * math.sqrt(k)
    m = (q * sv) @ torch.linalg.qr(torch.randn(k, k, generator=gm))[0].T
    g = gen(seed)
    return torch.randn(n, k, generator=g) @ m / math.sqrt(k) + 0.05 * torch.randn(n, k, generator=g)


def outlier_acts(n: int, k: int, seed: int = 0, n_out: int = 4, factor: float = 30.0):
    """[n, k] gaussian activations with ``n_out`` input channels ``factor`` times larger (the
    LLM activation outliers AWQ and SmoothQuant are about); returns (x, outlier channels)."""
    g = gen(seed)
    cols = torch.randperm(k, generator=gen(1234))[:n_out]
    x = torch.randn(n, k, generator=g)
    x[:, cols] *= factor
    return x, cols


class Block(nn.Module):
    """A pre-norm residual MLP block; ``scale`` arrives as a keyword argument."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x, scale: float = 1.0):
        return x + self.down(F.gelu(self.up(self.norm(x)))) * scale


class Net(nn.Module):
    """Linear in, a ModuleList of blocks, Linear head: layers before, inside and after the
    blocks."""

    def __init__(self, d_in=64, d=128, h=256, n_blocks=3, d_out=64):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n_blocks))
        self.head = nn.Linear(d, d_out)

    def forward(self, x, scale: float = 1.0):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=scale)
        return self.head(h)


def net(seed: int = 0, **kw) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net(**kw).eval()


def net_batches(n_batches: int = 4, rows: int = 64, d_in: int = 64, seed: int = 0,
                as_kwargs: bool = False) -> list:
    """Calibration batches of correlated rows, [2, rows/2, d_in] each (3-D like tokens)."""
    x = correlated(n_batches * rows, d_in, seed=seed)
    out = []
    for i in range(n_batches):
        b = x[i * rows:(i + 1) * rows].reshape(2, rows // 2, d_in)
        out.append({"x": b, "scale": 1.0} if as_kwargs else b)
    return out


def layer_inputs(model: nn.Module, layer: nn.Module, batches) -> torch.Tensor:
    """Rows [T, K] that ``layer`` receives when ``model`` runs on ``batches``."""
    rows = []
    h = layer.register_forward_hook(
        lambda m, a, o: rows.append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        h.remove()
    return torch.cat(rows)


def tiny_llama(hidden=256, layers=2, inter=512, vocab=512, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), vocab_size=vocab,
                      max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def token_batches(vocab: int, n_batches=2, batch=2, seq=32, seed=0, mask=False) -> list:
    g = gen(seed)
    out = []
    for _ in range(n_batches):
        d = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
        if mask:
            m = torch.ones(batch, seq, dtype=torch.long)
            m[0, seq // 2:] = 0  # right padding in the first row
            d["attention_mask"] = m
        out.append(d)
    return out
