"""Large CPU weights on transparent huge pages (pyquant/_hugepages.py): the layers' buffers move
there at swap and load time, bit for bit the same values, and nothing changes where it is off."""
import os

import pytest
import torch
from torch import nn

import pyquant
from pyquant import _hugepages

needs_thp = pytest.mark.skipif(not _hugepages.enabled(),
                               reason="no transparent huge pages here (not Linux, or 'never')")
BIG = (1024, 4096)  # int4: 2 MiB of packed codes, the smallest buffer that is moved


def _model(n=BIG[0], k=BIG[1]):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 64))


@needs_thp
def test_place_copies_exactly_onto_a_huge_page():
    t = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    p = _hugepages.place(t)
    assert p is not t and p.data_ptr() % _hugepages.HUGE_PAGE == 0
    assert torch.equal(p, t) and p.dtype == t.dtype and p.shape == t.shape
    assert _hugepages.on_huge_pages(p)
    assert _hugepages.place(p) is p  # already there: not moved again


def test_place_leaves_small_strided_and_grad_tensors():
    small = torch.zeros(_hugepages.MIN_BYTES - 1, dtype=torch.uint8)
    assert _hugepages.place(small) is small
    strided = torch.zeros(4096, 1024)[:, ::2]
    assert _hugepages.place(strided) is strided
    grad = torch.zeros(1 << 20, requires_grad=True)
    assert _hugepages.place(grad) is grad


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("PYQUANT_HUGEPAGES", "0")
    assert not _hugepages.enabled()
    t = torch.zeros(3 << 20, dtype=torch.uint8)
    assert _hugepages.place(t) is t


@needs_thp
def test_place_under_inference_mode_gives_a_normal_tensor():
    with torch.inference_mode():
        t = torch.arange(1 << 20, dtype=torch.float32)
        p = _hugepages.place(t)
    assert not p.is_inference() and torch.equal(p, t)
    p.add_(1)  # usable outside inference mode, as a swapped layer's buffer is


@needs_thp
@pytest.mark.parametrize("config", [pyquant.Int4WeightOnly(group_size=128), pyquant.Int8Dynamic()],
                         ids=["int4wo", "int8dyn"])
def test_quantize_and_load_place_the_large_buffers(tmp_path, config):
    ref = _model()
    x = torch.randn(3, BIG[1])
    m = _model()
    with torch.inference_mode():
        pyquant.quantize_(m, config)
        y = m(x)
    big = [b for b in m[0].buffers() if b.numel() * b.element_size() >= _hugepages.MIN_BYTES]
    assert big, "the test layer should have a buffer large enough to move"
    assert all(b.data_ptr() % _hugepages.HUGE_PAGE == 0 for b in big)
    assert all(_hugepages.on_huge_pages(b) for b in big)
    # the small layer keeps the allocator's memory
    assert all(b.data_ptr() % _hugepages.HUGE_PAGE != 0 or b.numel() == 0
               for b in m[2].buffers())
    # the same results as a layer never moved
    os.environ["PYQUANT_HUGEPAGES"] = "0"
    try:
        m0 = _model()
        pyquant.quantize_(m0, config)
        assert all(b.data_ptr() % _hugepages.HUGE_PAGE != 0 for b in m0[0].buffers())
        with torch.inference_mode():
            assert torch.equal(m0(x), y)
    finally:
        del os.environ["PYQUANT_HUGEPAGES"]
    path = tmp_path / "m.safetensors"
    pyquant.save(m, path)
    pyquant.load(ref, path)
    big = [b for b in ref[0].buffers() if b.numel() * b.element_size() >= _hugepages.MIN_BYTES]
    assert big and all(_hugepages.on_huge_pages(b) for b in big)
    with torch.inference_mode():
        assert torch.equal(ref(x), y)
