"""Test setup: 8 forced CPU devices (sharding tests), CPU only, one torch thread per worker,
the project's malloc setting (vlm_jax/host.py) as the entry points apply it."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def sat_config(data_dir, arg="tiny", **overrides):
    """configs/sat.py:<arg> reading data from ``data_dir``; ``a__b=v`` overrides ``a.b``."""
    from vlm_jax import config_lib
    ov = {"data.data_dir": data_dir}
    ov.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return config_lib.load_config(f"{SAT_CONFIG}:{arg}", ov)
