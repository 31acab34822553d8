"""pyquant.runtime.keep_freed_memory: applied where the C library is glibc, and what it is
for: a large block freed and allocated again comes back without page faults."""
import subprocess
import sys

import pytest

from pyquant import runtime

LINUX = sys.platform.startswith("linux")


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1G"])
def test_bad_threshold_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="trim_threshold must be an int >= 0"):
        runtime.keep_freed_memory(bad)


_CHILD = """
import resource, torch
from pyquant import runtime
assert runtime.keep_freed_memory()
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t = torch.empty(4 << 20, dtype=torch.float32)  # 16 MB, freed at the next assignment
        t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_round(), faults_of_one_round()  # the heap grows to hold the blocks
print(sum(faults_of_one_round() for _ in range(6)))
"""


@pytest.mark.skipif(not LINUX, reason="glibc's malloc is what the setting tunes")
def test_freed_blocks_come_back_without_page_faults():
    """With the setting, 16 MB tensors allocated and freed over and over reuse the heap's
    blocks: once the heap has grown to hold them, six more rounds of five take fewer page
    faults than one block would (4096). Without it glibc returns such blocks to the OS and
    faults them in again (8-16 K faults a round here), except when its dynamic mmap threshold
    happens to adapt, so only this side can be asserted. In a child process: the setting is
    process-wide."""
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip().splitlines()[-1]) < 4096


def test_returns_false_off_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runtime.keep_freed_memory() is False
