"""Session-wide test setup.

* PYQUANT_REQUIRE_NATIVE=1 (CI, release builds): the native module must load, or the whole
  session stops at once with the loader's error instead of silently skipping every native test.
* The header of the report says which backends and instruction sets the run covers.
* Every test starts and ends with pyquant's process-wide knobs (forced backend, forced ISA,
  torch thread count) as the session found them, so one test cannot leak into the next.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# tests/ holds helpers.py; make it importable whatever the rootdir/import mode.
sys.path.insert(0, os.path.dirname(__file__))


def _native_summary() -> str:
    from pyquant import _native

    if not _native.available():
        return f"pyquant native: NOT LOADED ({_native.load_error()})"
    from helpers import available_isas

    mod = _native.module()
    best = _native.ISA_NAMES[mod.best_isa()]
    return f"pyquant native: loaded; ISAs here: {', '.join(available_isas())} (best {best})"


def pytest_report_header(config):
    return [_native_summary(), f"torch {torch.__version__}, {torch.get_num_threads()} threads"]


def pytest_sessionstart(session):
    if os.environ.get("PYQUANT_REQUIRE_NATIVE", "").strip() not in ("", "0"):
        from pyquant import _native

        if not _native.available():
            pytest.exit(
                "PYQUANT_REQUIRE_NATIVE is set but pyquant's native module pyquant._C did not "
                f"load: {_native.load_error()}. Build it with "
                "`pip install --no-build-isolation -e . -Ceditable.mode=inplace`.",
                returncode=1,
            )


@pytest.fixture(autouse=True)
def _restore_pyquant_state():
    from pyquant import _native, ops

    threads = torch.get_num_threads()
    forced = getattr(ops._state, "forced", None)
    isa = _native._isa_override
    yield
    torch.set_num_threads(threads)
    ops._state.forced = forced
    _native._isa_override = isa


@pytest.fixture
def no_backend_env(monkeypatch):
    """Automatic backend/ISA selection, whatever the caller's environment forces."""
    monkeypatch.delenv("PYQUANT_BACKEND", raising=False)
    monkeypatch.delenv("PYQUANT_CPU_ISA", raising=False)
