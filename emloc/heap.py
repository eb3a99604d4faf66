"""Heap tuning for training steps (glibc only): caches that keep freed activations from merging switched
off for ``emloc`` commands, and large allocations returned to the OS under a memory budget."""
from __future__ import annotations

import os
import platform
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def keep_heap_small(threshold_bytes: int = 128 * 1024) -> bool:
    """Serve every allocation above ``threshold_bytes`` by its own mmap, returned to the OS when freed
    (glibc).

    glibc raises its mmap threshold after large blocks are freed (up to 32 MB), so a training step's
    activations end up carved from the heap, whose freed holes stay resident. Measured on the default model
    (LoRA on the emulator, checkpointing on, batch 8): peak RSS 1329 MB with the dynamic threshold, 860 MB
    with a fixed one. Same as ``MALLOC_MMAP_THRESHOLD_=131072``; results do not change. Returns False where
    it does not apply (not glibc).
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


COMPACT_HEAP_TUNABLES = {"glibc.malloc.tcache_count": "0", "glibc.malloc.mxfast": "0"}
"""glibc tunables under which a training step's freed activations are reused instead of piling up.

torch allocates 64-byte aligned blocks; glibc's aligned allocation splits a few bytes off the front of each
block, and those splinters wait in the per-thread cache (tcache) and the fast bins, which count as in use, so
the large holes beside them never merge and each new activation extends the heap. With both caches off the
holes merge. Measured on the default model (``emloc train --on emulator``, batch 8, checkpointing, two
threads): peak RSS about 1.19 GB instead of 1.45-1.50 GB, and the step no slower (benchmarks/README.md).
glibc reads tunables only at start-up, hence :func:`relaunch_with_compact_heap`."""
OPT_OUT = "EMLOC_DEFAULT_HEAP"
"""Set to 1 to keep glibc's default caches (no relaunch)."""


def compact_heap_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to relaunch with, or None when no relaunch is due (tunables already set by anyone,
    opted out, or not glibc on Linux). Tunables the user set are kept; ours are added after them."""
    if environ.get(OPT_OUT) == "1" or not sys.platform.startswith("linux") or not _is_glibc():
        return None
    current = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    named = {item.split("=", 1)[0] for item in current}
    missing = [f"{key}={value}" for key, value in COMPACT_HEAP_TUNABLES.items() if key not in named]
    return {**environ, "GLIBC_TUNABLES": ":".join(current + missing)} if missing else None


def compact_heap_active(environ: dict[str, str] | None = None) -> bool:
    """Whether this process started with :data:`COMPACT_HEAP_TUNABLES` (as ``emloc`` commands do)."""
    current = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    return all(f"{key}={value}" in current.split(":") for key, value in COMPACT_HEAP_TUNABLES.items())


def relaunch_with_compact_heap() -> None:
    """Re-execute this command (same interpreter, same arguments, same process id) with the compact-heap
    tunables, before anything heavy is imported. Returns without doing anything when none is due."""
    environ = compact_heap_environment(dict(os.environ))
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]), environ)


def _is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def small_heap_for_budget(memory_budget: str | None) -> bool:
    """Whether training under ``memory_budget`` should also return freed blocks to the OS
    (:func:`keep_heap_small`): only when a budget is set and the compact heap is not already active, since
    mapping every block anew costs a page fault per page (the step about twice as slow)."""
    return memory_budget is not None and not compact_heap_active()
