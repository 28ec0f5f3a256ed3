"""Compilation target and thread count for the TVM backend.

TVM 0.27 targets are JSON-like dicts (``{"kind": "llvm", "mcpu": ..., "mtriple": ...}``); the old
``"llvm -mcpu=native"`` strings are rejected. The host CPU is asked from LLVM itself
(``llvm_get_system_cpu``), and the triple is normalised to ``<arch>-linux-gnu`` on Linux because the
pip wheel reports the triple it was built on (e.g. ``x86_64-conda-linux-gnu``).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import tvm
from tvm.target import codegen

from ...errors import ConfigError


def host_triple() -> str:
    machine = platform.machine().lower()
    if sys.platform.startswith("linux") and machine in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"{'x86_64' if machine in ('x86_64', 'amd64') else 'aarch64'}-linux-gnu"
    return str(codegen.llvm_get_system_triple())


def host_target() -> tvm.target.Target:
    """The host CPU as an LLVM target: ``mcpu`` from LLVM's own detection (e.g. ``znver3``)."""
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "mtriple": host_triple()}
    )


def resolve_target(target: Any = None) -> tvm.target.Target:
    """``None`` -> :func:`host_target`; a dict / JSON string / ``Target`` is passed to TVM as is."""
    if target is None:
        return host_target()
    if isinstance(target, tvm.target.Target):
        tgt = target
    else:
        try:
            tgt = tvm.target.Target(target)
        except Exception as err:  # TVM raises its own error types for bad targets
            raise ConfigError(f"TVM rejected target {target!r}: {str(err).splitlines()[-1]}") from err
    if tgt.kind.name != "llvm":
        raise ConfigError(f"the sparsecomp TVM backend compiles for CPU (llvm) targets, got {tgt.kind.name!r}")
    return tgt


def default_threads() -> int:
    """Cores this process may use (affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_CURRENT_THREADS: list[int] = [0]


def set_threads(num_threads: int) -> None:
    """Resize TVM's (process-wide) thread pool if it is not already ``num_threads`` wide."""
    if num_threads < 1:
        raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
    if _CURRENT_THREADS[0] != num_threads:
        # TVM pins the calling thread to one core while it configures its pool (threading_backend's
        # affinity setup); the caller's mask is restored after, or every later torch op of the process
        # ran on that one core (a small CNN's training in the test suite: 1.2 -> 31 s)
        mask = _affinity()
        # mode 1 = "big cores"; the runtime uses min(nthreads, cores) workers
        tvm.get_global_func("runtime.config_threadpool")(1, num_threads)
        _CURRENT_THREADS[0] = num_threads
        if mask is not None and _affinity() != mask:
            os.sched_setaffinity(0, mask)


def _affinity() -> set | None:
    """The calling thread's CPU mask, ``None`` where the OS has no such call."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return None
