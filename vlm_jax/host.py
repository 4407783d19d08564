"""Host (CPU) memory allocator settings for XLA:CPU jobs. Imports nothing heavy (no jax).

Why: an XLA:CPU executable allocates its temporary buffer (all the activations of a
training step: 819 MB for a CLIP ViT-S/16 forward+backward at batch 8) from the C heap on
every call and frees it afterwards. glibc serves allocations this large with ``mmap`` (or
from per-thread arenas that it trims), so every step gets fresh pages from the kernel: on
this project's 2-core machine that was ~212,000 minor page faults and ~0.3 s of kernel
time per ViT-S/16 step (measured with ``getrusage``; BENCHMARKS.md, towers). Keeping freed
memory in the process removes them: the step went from 872 ms to 711 ms.

`tune_malloc` sets, through glibc's ``mallopt`` (Linux/glibc only; a no-op elsewhere):

  M_ARENA_MAX = 1         one heap for all threads (XLA's pool threads included), so that
                          the two settings below govern every allocation
  M_MMAP_MAX = 0          never serve an allocation with its own ``mmap``
  M_TRIM_THRESHOLD = 2 GiB  do not hand free memory at the top of the heap back to the kernel
                          until 2 GiB of it is free

Cost: the process keeps its peak heap (the step's buffers are reused, not returned), and
with one arena, threads that allocate concurrently share one lock — negligible for the
large, few allocations of XLA:CPU and for the input pipeline's threads here. The GPU and
TPU paths allocate device memory elsewhere and are unaffected.

Call it before jax (or torch) allocates much: `train.py`, `eval.py` and the benchmark
scripts call it first thing. ``VLM_JAX_TUNE_MALLOC=0`` in the environment turns it off.
"""
from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "VLM_JAX_TUNE_MALLOC"

# glibc <malloc.h> mallopt parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = {"M_ARENA_MAX": (M_ARENA_MAX, 1),
            "M_MMAP_MAX": (M_MMAP_MAX, 0),
            "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2 ** 31 - 1)}

_applied: dict | None = None


def _glibc():
    """The process's C library if it is glibc (has ``mallopt`` and
    ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(enable: bool | None = None) -> dict:
    """Apply the allocator settings of the module docstring once per process.

    Args:
      enable: None -> on unless the environment has ``VLM_JAX_TUNE_MALLOC=0``;
        False -> do nothing.
    Returns:
      ``{'applied': bool, 'reason': str, 'settings': {name: value}}`` (settings: those
      mallopt accepted).
    """
    global _applied
    if enable is None:
        enable = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")
    if not enable:
        return {"applied": False, "reason": f"disabled ({ENV_VAR}=0 or enable=False)", "settings": {}}
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None:
        return {"applied": False, "reason": "not Linux/glibc", "settings": {}}
    done = {name: value for name, (param, value) in SETTINGS.items() if libc.mallopt(param, value) == 1}
    _applied = {"applied": len(done) == len(SETTINGS),
                "reason": "ok" if len(done) == len(SETTINGS) else "mallopt refused some settings",
                "settings": done}
    return _applied
