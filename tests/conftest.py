"""Test setup: 8 forced CPU devices (sharding tests), XLA:CPU optimisation level 0 (compile time), CPU only, one torch thread per worker,
the project's malloc setting (vlm_jax/host.py) as the entry points apply it, one XLA compilation cache per session."""
import os

# 8 host devices for the sharding tests; XLA:CPU backend optimisation level 0 because the tests' tiny
# models spend most of their time compiling (a Flamingo init compiles 3x faster; the programs
# themselves run a little slower, numerics are IEEE either way). Subprocess tests pass FAST_COMPILE.
FAST_COMPILE = "--xla_backend_optimization_level=0"    # XLA_FLAGS of the tests' subprocesses
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# One persistent XLA compilation cache per test session, shared by the xdist workers and by the subprocess tests
# (they inherit this environment): a program compiled again (a resumed run, the other process of a two-process test,
# the same tiny config in another module) is read back instead of compiled (the SIGKILL resume test: 76 s -> 55 s).
# Created by the first process that imports this file (the xdist controller) and removed when it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _XLA_CACHE = tempfile.mkdtemp(prefix="vlm_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vlm_jax import host  # noqa: E402

host.tune_malloc()   # as train.py does, before jax/torch allocate (vlm_jax/host.py)

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # torch is only a test oracle
    pass


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data_dir per test module (the tiny synthetic set is built on first use)."""
    return str(tmp_path_factory.mktemp("tfds"))


SAT_CONFIG = os.path.join(ROOT, "configs", "sat.py")


def family_config(family, data_dir, arg="tiny", **overrides):
    """configs/<family>.py:<arg> reading data from ``data_dir``; ``a__b=v`` overrides ``a.b``."""
    from vlm_jax import config_lib
    ov = {"data.data_dir": data_dir}
    ov.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return config_lib.load_config(f"{os.path.join(ROOT, 'configs', family + '.py')}:{arg}", ov)


def sat_config(data_dir, arg="tiny", **overrides):
    """configs/sat.py:<arg> (`family_config`)."""
    return family_config("sat", data_dir, arg, **overrides)


def final_params(config, workdir):
    """(task, host params) of the last checkpoint of the run in ``workdir`` trained with ``config``:
    what tests compare across stages (a frozen tower bit-identical, a trained one moved)."""
    import jax
    from vlm_jax import checkpoint as ckpt_lib, train_lib
    task, mesh = train_lib.make_task_and_mesh(config, workdir)
    prog = train_lib.build_program(config, task, mesh)
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    _, state, _ = train_lib.restore_state(prog, ck, config, task, data_state=False)
    ck.close()
    return task, jax.device_get(state.full_params())


def random_params(abstract, seed, *, random_gates: bool = False):
    """Fill an abstract (`jax.eval_shape`) param tree from numpy: norms near 1 / 0, kernels
    N(0, 1/fan_in), tables N(0, 1); Flamingo's tanh gates ``alpha_*`` 0 (as the module inits them)
    or, with ``random_gates``, +-U(0.5, 1) so the cross-attention matters. (A jitted `init` of a
    Flamingo composition takes ~30 s of XLA:CPU compile for its RNG; this takes milliseconds.)"""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name, shape = path[-1].key, x.shape
        if name.startswith("alpha_"):
            if random_gates:
                return jnp.asarray(rng.choice([-1, 1]) * rng.uniform(0.5, 1.0), x.dtype)
            return jnp.zeros(shape, x.dtype)
        if name in ("scale", "bias"):
            return jnp.asarray((name == "scale") + 0.1 * rng.normal(size=shape), x.dtype)
        fan_in = 1                                      # tables: latents, time / token / position embeddings
        if name == "kernel":                            # q/k/v [Din, H, K]; out [H, K, D]; dense [Din, Dout]
            fan_in = shape[0] if path[-2].key in ("query", "key", "value") else int(np.prod(shape[:-1]))
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


#: The modules holding the longest single tests (profile of 2026-12-07, 2-core "AMD EPYC": 69, 63, 46,
#: 45, 41, 38, 31 s), collected first. xdist hands tests out in collection order, so a one-minute test
#: collected last runs alone at the end while the other worker idles; longest first, the short tests
#: fill the end. Whole modules move, in their own order, so module-scoped fixtures are shared as before.
LONG_MODULES_FIRST = ("test_multihost_preemption.py", "test_flamingo_task.py", "test_blip2.py", "test_trainer.py",
                      "test_multihost.py", "test_layers.py", "test_fault_injection.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: the rest keep their order
