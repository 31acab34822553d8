"""Quality on a real model: all-MiniLM-L6-v2 quantized with each config must keep its sentence
embeddings close to fp32's on real sentences it was not calibrated on.

Floors (mean cosine to fp32 over 128 evaluation sentences) sit just under what round-to-nearest
of the canonical formats gives (int8 weight-only 0.9996, int8 dynamic 0.9976, int4 g64
asymmetric 0.970, symmetric 0.954 when written): a drop below them means a format, kernel or
swap bug, not noise. Runs in the normal suite; skipped only without the model.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pyquant
from pyquant import models

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(models.minilm_missing_reason() is not None,
                       reason=f"all-MiniLM-L6-v2: {models.minilm_missing_reason()}"),
]

N_SENTENCES = 128
CASES = [
    # id, config, floor of the mean cosine to fp32
    ("int8wo", pyquant.Int8WeightOnly(), 0.999),
    ("int8dyn", pyquant.Int8Dynamic(), 0.997),
    ("int4g64", pyquant.Int4WeightOnly(group_size=64), 0.96),
    ("int4g64sym", pyquant.Int4WeightOnly(group_size=64, symmetric=True), 0.94),
]


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = models.load_minilm()
    sents = models.sentences("eval")[:N_SENTENCES]
    batches = models.tokenize(tokenizer, sents, batch_size=N_SENTENCES)
    ref = models.encode_batches(model, batches)
    return model, tokenizer, sents, batches, ref


def test_fp32_embeddings_are_sentence_embeddings(minilm):
    model, tokenizer, sents, _, ref = minilm
    assert ref.shape == (N_SENTENCES, 384) and ref.dtype == torch.float32
    assert torch.allclose(ref.norm(dim=1), torch.ones(N_SENTENCES), atol=1e-5)
    # padding is masked out: other batchings give the same embeddings
    again = models.encode(model, tokenizer, sents[:10], batch_size=3)
    assert torch.allclose(again, ref[:10], atol=1e-4)
    # and the model means something: a paraphrase is closer than an unrelated sentence
    e = models.encode(model, tokenizer, [
        "How long should I boil an egg to get a soft yolk?",
        "What is the cooking time for a soft-boiled egg?",
        "The central bank kept interest rates unchanged.",
    ])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3


@pytest.mark.parametrize("name, config, floor", CASES, ids=[c[0] for c in CASES])
def test_quantized_minilm_stays_close_to_fp32(minilm, name, config, floor):
    model, _, _, batches, ref = minilm
    qmodel = copy.deepcopy(model)
    report = pyquant.quantize_(qmodel, config)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(report.swapped) == n_linear == 37 and not report.skipped, str(report)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pyquant:", category=RuntimeWarning)
        emb = models.encode_batches(qmodel, batches)
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
    mean, low = float(cos.mean()), float(cos.min())
    print(f"\nMiniLM {name:<11} {config!r}: mean cosine to fp32 {mean:.5f}, min {low:.5f} "
          f"over {len(cos)} sentences (floor {floor})")
    assert torch.isfinite(emb).all()
    assert mean >= floor, f"{name}: mean cosine {mean:.5f} < {floor}"
