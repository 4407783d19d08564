"""Shared command-line handling for train.py and eval.py (flags + `--config.key=value` overrides).

Errors (a bad config key included) are raised, not printed: the entry points run inside the one
error boundary, `vlm_jax.errors.run_cli`, which prints them with their category and exit code."""
from __future__ import annotations

import argparse
import logging
import sys

from vlm_jax import config_lib, errors


def parse(argv: list[str], description: str, with_step: bool = False):
    rest, overrides = config_lib.split_config_argv(argv)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="configs/<family>.py:VARIANT[,key=value,...]")
    p.add_argument("--workdir", required=True, help="directory for checkpoints, logs, results")
    if with_step:
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--log_level", default="INFO")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of a project error (also: VLM_JAX_DEBUG=1)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detects TPU pods, SLURM, Open MPI)")
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (explicit multi-host)")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    args = p.parse_args(rest)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not (args.debug or errors.debug_enabled()):     # --debug keeps the libraries' tracebacks
        errors.quiet_async_noise()
        absl_logger = logging.getLogger("absl")
        if not any(isinstance(f, errors.OneLineLibraryErrors) for f in absl_logger.filters):
            absl_logger.addFilter(errors.OneLineLibraryErrors())
    config = config_lib.load_config(args.config, overrides)
    if args.distributed or args.coordinator_address:
        import jax
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
        logging.getLogger("vlm_jax").info("process %d of %d, %d local / %d global devices",
                                          jax.process_index(), jax.process_count(),
                                          jax.local_device_count(), jax.device_count())
    return args, config
