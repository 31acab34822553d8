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
import resource, sys, torch
from pyquant import runtime
if sys.argv[1] == "1":
    assert runtime.keep_freed_memory()
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t = torch.empty(4 << 20, dtype=torch.float32)  # 16 MB, freed at the next assignment
        t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_round()
print(faults_of_one_round())
"""


@pytest.mark.skipif(not LINUX, reason="glibc's malloc is what the setting tunes")
def test_freed_blocks_come_back_without_page_faults():
    """Without the setting glibc gives a freed 16 MB block back to the OS (mmapped, or trimmed
    off the heap's top once its dynamic threshold has grown), so at least one of five takes
    4096 page faults again; with it the block is reused from the heap. In a child process:
    the setting is process-wide."""
    def faults(apply):
        r = subprocess.run([sys.executable, "-c", _CHILD, apply], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])
    default, kept = faults("0"), faults("1")
    assert default >= 4000  # at least one fresh 16 MB block
    assert kept < 400


def test_returns_false_off_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runtime.keep_freed_memory() is False
