"""vlm_jax.host.tune_malloc: freed large blocks stay in the process (no fresh page faults
per reuse), the opt-out works, and it is a no-op off glibc."""
import json
import os
import subprocess
import sys

import pytest

from vlm_jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free a 64 MiB block 6 times through the C heap (as XLA:CPU does with
# its per-step temporary buffer); report the minor page faults of the last 5 rounds.
PROBE = r"""
import ctypes, json, resource, sys
sys.path.insert(0, sys.argv[1])
from vlm_jax import host
state = host.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 64 << 20
faults = []
for i in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps(dict(state=state, faults=faults[1:])))
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop(host.ENV_VAR, None)
    if env_value is not None:
        env[host.ENV_VAR] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, ROOT], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host._glibc() is None, reason="needs Linux/glibc")
def test_tuned_malloc_reuses_freed_pages():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    tuned = _probe(None)
    assert tuned["state"]["applied"], tuned
    assert max(tuned["faults"]) < pages // 20, tuned        # block reused: (almost) no new faults
    default = _probe("0")
    assert not default["state"]["applied"]
    assert "disabled" in default["state"]["reason"]
    # glibc's default mmap()s a 64 MiB block and unmaps it on free: every round faults it in again
    assert min(default["faults"]) > pages // 2, default


def test_disabled_and_non_glibc(monkeypatch):
    assert host.tune_malloc(enable=False)["applied"] is False
    monkeypatch.setattr(host, "_applied", None)
    monkeypatch.setattr(host, "_glibc", lambda: None)
    state = host.tune_malloc(enable=True)
    assert state == {"applied": False, "reason": "not Linux/glibc", "settings": {}}
