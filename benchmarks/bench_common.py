"""Helpers shared by the step benchmarks (flamingo_step.py, blip2_step.py) and the probes (*_probe.py). Import this module
before jax / torch: `limit_threads` must size the thread pools before they start."""
from __future__ import annotations

import os


def limit_threads(n):
    """Before jax/torch are imported: pin to the first n allowed CPUs, size the OpenMP/MKL pools.
    Child processes inherit the affinity and the environment."""
    allowed = sorted(os.sched_getaffinity(0))
    n = len(allowed) if n is None else n
    if not 1 <= n <= len(allowed):
        raise SystemExit(f"--threads {n}: this process may use {len(allowed)} CPUs; choose 1..{len(allowed)}.")
    os.sched_setaffinity(0, allowed[:n])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    # OpenMP threads that spin while waiting lose their CPUs to other processes on a shared host
    # (2 threads on 2 busy cores: a 256x256 matmul 16 ms instead of 0.4 ms); passive waiting
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return n


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (every CPU figure names it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def hardware() -> str:
    """'<GPU device kind>' or '<CPU model>, <n> threads' plus the load average: the line every
    benchmark table names."""
    import jax
    d = jax.devices()[0]
    if d.platform == "gpu":
        return d.device_kind
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} threads, load {load:.1f} at start"


def probe_run(doc: str, default_config: str, argv=None, add_arguments=None):
    """The probes' shared command line: ``--workdir`` (a trained run), ``--config`` ('configs/x.py:VARIANT',
    default ``default_config``) and the run's own ``--config.a.b=v`` overrides, as for eval.py;
    ``add_arguments(parser)`` adds a probe's own flags. ``doc``: the probe's module docstring (its first
    paragraph is the --help description). -> (args, config, task, step, state) of the latest checkpoint."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the trained run's workdir")
    p.add_argument("--config", default=default_config, help="the run's config spec (+ its --config.* overrides)")
    if add_arguments is not None:
        add_arguments(p)
    args, rest = p.parse_known_args(argv)
    return (args, *restore_run(args.config, args.workdir, rest))


def restore_run(config_spec: str, workdir: str, argv_rest):
    """The latest checkpoint of a trained run, for the probes and evaluation benchmarks:
    ``config_spec`` ('configs/x.py:VARIANT') + ``--config.a.b=v`` overrides left in ``argv_rest``
    -> (config, task, step, state), through `vlm_jax.eval_lib.restore` (its checks and errors)."""
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from vlm_jax import config_lib, eval_lib
    _, overrides = config_lib.split_config_argv(list(argv_rest))
    config = config_lib.load_config(config_spec, overrides)
    task, step, state = eval_lib.restore(config, workdir)
    return config, task, step, state
