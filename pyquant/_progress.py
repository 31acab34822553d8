"""A progress bar when tqdm is installed and the work is long enough to watch; otherwise a
plain iterator. tqdm is optional: importing pyquant never needs it."""
from __future__ import annotations

import os
import sys


def progress(iterable, desc: str, total=None, min_items: int = 8):
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    quiet = os.environ.get("PYQUANT_QUIET") or (total is not None and total < min_items)
    if quiet:
        return iterable
    try:
        from tqdm.auto import tqdm
    except Exception:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr,
                disable=not (sys.stderr.isatty() or _in_notebook()))


def _in_notebook() -> bool:
    """True in a Jupyter kernel, whose stderr is no terminal but whose cells show tqdm.auto's
    widget bars (logs and pipes still get none)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"
