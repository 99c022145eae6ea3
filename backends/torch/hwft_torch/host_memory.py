"""The host process's memory on the CPU: its peak resident size, and glibc's malloc told to keep
freed memory for reuse (the torch engine's loop calls it before a CPU run; imports nothing of
the engine, so the loop and the device runtimes both can)."""

from __future__ import annotations


def cpu_peak_rss() -> int:
    """The process's peak resident memory in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_current_rss() -> int | None:
    """The process's resident memory now in bytes (Linux /proc/self/statm); None elsewhere."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def cpu_anonymous_bytes() -> int | None:
    """The process's anonymous memory in bytes, resident or swapped (``RssAnon`` + ``VmSwap`` of
    /proc/self/status); None elsewhere. Unlike the resident size, it does not fall when the
    kernel reclaims file-backed pages (code, mapped files) under another process's memory
    pressure: what the process holds of its own allocations, wherever the kernel put it."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmSwap"):
                    fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return fields["RssAnon"] + fields.get("VmSwap", 0) if "RssAnon" in fields else None


#: glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
#: how far the heap grows beyond each request, and how much free top it keeps
HEAP_TOP_PAD = 512 << 20
#: blocks from this size up get a mapping of their own while the model loads: below the packed
#: bytes of a 512x512 4-bit weight (128 KiB) and bitsandbytes' temporaries while it quantises one
PASSING_BLOCK = 64 << 10


def _mallopt():
    """glibc's mallopt, or None where the C library is not glibc."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def map_passing_blocks() -> bool:
    """While the model loads: every block of 64 KiB or more in a mapping of its own, returned to
    the system when freed. Loading passes each weight through blocks it frees again (a tensor
    read before it is cast, sliced or quantised; bitsandbytes' temporaries), between which it
    keeps small ones (4-bit quantisation state, a shard). From the heap, the small ones pin the
    freed space between them: with glibc's default (its mmap threshold rises to the largest block
    freed) loading left many times more resident than it kept, and with this threshold about
    what it kept (docs/benchmarks.md, "The measurements behind the code"). Each block of 64 KiB
    or more kept while loading holds one of the process's mappings (Linux allows 65,530): a
    70B-class model's shards, adapters and states are a few thousand. The steps' settings
    (:func:`keep_freed_host_memory`) follow once the model is loaded."""
    mallopt = _mallopt()
    return bool(mallopt) and mallopt(M_MMAP_THRESHOLD, PASSING_BLOCK) == 1


def keep_freed_host_memory() -> str | None:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the system.

    A CPU training step allocates and frees the same activations every step. By default glibc
    serves a block that the heap's free top cannot hold with a fresh mapping (the chunked
    cross-entropy's 128 MiB of logits, for one) and trims the heap's free top, so each step
    faults much of its memory in again, page by page: tens of thousands of page faults a step on
    the bench workload (``ru_minflt``; docs/benchmarks.md). No mmap at all
    (``M_MMAP_MAX`` 0: every block comes from the heap; the mmap threshold alone cannot rise
    above 32 MiB), a 512 MiB top pad (the heap grows by that much more than asked; untouched
    pages cost no memory) and no trimming let later steps reuse pages already touched: no page
    faults after the first steps. The process keeps its high-water mark until it exits, which a
    training run does anyway. This is why torch's CPU tuning guide recommends jemalloc or
    tcmalloc; mallopt needs no preload. Returns the log line, or None where the C library is
    not glibc.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return None
    settings = ((M_MMAP_MAX, 0), (M_TOP_PAD, HEAP_TOP_PAD), (M_TRIM_THRESHOLD, 2**31 - 1))
    if not all(mallopt(param, value) == 1 for param, value in settings):
        return None
    return "host memory: glibc malloc keeps freed memory for reuse (512 MiB heap top pad, no trimming)"


def reset_peak_rss() -> bool:
    """Start the process's peak resident size (VmHWM) again from its size now: Linux's
    ``/proc/self/clear_refs`` 5. ``ru_maxrss`` (:func:`cpu_peak_rss`) keeps the whole run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_rss_since_reset() -> int | None:
    """The process's peak resident size in bytes since :func:`reset_peak_rss` (VmHWM); None
    where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
