"""Where per-machine measurements are kept (TVM prefetch plans, latency and break-even tables)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: Environment variable that overrides the cache folder.
CACHE_ENV = "SPARSECOMP_CACHE_DIR"


def cache_dir() -> Path:
    """``$SPARSECOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparsecomp``, else ``~/.cache/sparsecomp``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsecomp"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows: measurements are keyed by it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
