"""pyquant.runtime.keep_freed_memory: applied where the C library is glibc, and what it is
for: a large block freed and allocated again comes back without page faults."""
import platform
import subprocess
import sys

import pytest

from pyquant import runtime


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1G"])
def test_bad_threshold_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="trim_threshold must be an int >= 0"):
        runtime.keep_freed_memory(bad)


@pytest.mark.parametrize("bad", [1, None, "yes"])
def test_bad_large_blocks_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="large_blocks must be True or False"):
        runtime.keep_freed_memory(large_blocks=bad)


_CHILD = """
import ctypes, resource, sys, torch
from pyquant import runtime
# glibc's default mmap threshold adapts to the blocks freed (so it may keep 16 MB blocks on
# its own); fixed at 128 KiB it does not, and every such block is mmapped and faulted in
assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10) == 1
if sys.argv[1] == "kept":
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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what the "
                    "setting tunes")
def test_freed_blocks_come_back_without_page_faults():
    """From a malloc that returns every 16 MB block to the OS (mmap threshold fixed at
    128 KiB), six rounds of five such tensors take a page fault per page of each block;
    after keep_freed_memory() they reuse the heap's blocks and take fewer faults than one
    block has pages (4096). In child processes: the setting is process-wide."""
    def faults(mode):
        r = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])
    assert faults("default") >= 6 * 4096
    assert faults("kept") < 4096


def test_returns_false_off_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runtime.keep_freed_memory() is False


_CHILD_LARGE = """
import resource, sys, torch
from pyquant import runtime
if sys.argv[1] != "default":
    assert runtime.keep_freed_memory(large_blocks=sys.argv[1] == "large")
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        t = torch.empty(12 << 20, dtype=torch.float32)  # 48 MB: above any mmap threshold
        t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_round(), faults_of_one_round()
print(sum(faults_of_one_round() for _ in range(4)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what the "
                    "setting tunes")
def test_large_blocks_come_back_without_page_faults():
    """A 48 MB block is above the largest mmap threshold glibc takes (32 MB): with glibc's
    settings, and with keep_freed_memory() alone, each is mapped afresh and faulted in page by
    page (four rounds of three: >= 12 x 12288 faults); with large_blocks=True they come from
    the heap and back to it, fewer faults than one block has pages."""
    def faults(mode):
        r = subprocess.run([sys.executable, "-c", _CHILD_LARGE, mode], capture_output=True,
                           text=True, check=False)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])
    pages = (48 << 20) // 4096
    assert faults("default") >= 12 * pages
    assert faults("kept") >= 12 * pages
    assert faults("large") < pages


def test_progress_bars_show_in_a_notebook_but_not_in_a_log(monkeypatch):
    """A Jupyter kernel's stderr is no terminal, but its cells show tqdm.auto's bars; a log or
    a pipe gets none."""
    import sys
    import types

    pytest.importorskip("tqdm")
    from pyquant import _progress

    monkeypatch.delenv("PYQUANT_QUIET", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = _progress.progress(range(10), desc="x")
    assert getattr(bar, "disable", True)  # no terminal, no notebook: off

    class ZMQInteractiveShell:  # the kernel's shell class, by name
        pass

    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: ZMQInteractiveShell()
    monkeypatch.setitem(sys.modules, "IPython", fake)
    bar = _progress.progress(range(10), desc="x")
    assert bar.disable is False
    bar.close()
