"""Train (and finally evaluate) a model: python train.py --config configs/sat.py:synthetic --workdir runs/sat

Exit codes (vlm_jax/errors.py, docs/reliability.md): 0 finished, 75 stopped early by SIGTERM
(resumable: rerun the same command), 3-9 a project error with a one-message explanation on
stderr, 1 a bug (traceback). --debug (or VLM_JAX_DEBUG=1) shows the traceback of any error."""
import sys

from vlm_jax import host

host.tune_malloc()   # before jax allocates: XLA:CPU step buffers reuse heap pages (vlm_jax/host.py)

from vlm_jax import cli, errors  # noqa: E402


def _train(argv) -> int:
    args, config = cli.parse(argv, "Train a vlm_jax model, then evaluate it.")
    from vlm_jax import train_lib
    result = train_lib.train(config, args.workdir)
    if result.stopped_early:
        why = " (SIGTERM)" if result.preempted else ""
        print(f"stopped early at step {result.step} of {config.train.num_steps}{why}: its checkpoint is in "
              f"{args.workdir}/checkpoints. Rerun the same command to resume (exit code {errors.EXIT_PREEMPTED}).",
              file=sys.stderr, flush=True)
        return errors.EXIT_PREEMPTED
    train_lib.final_evaluation(result, args.workdir)
    return errors.EXIT_OK


def main(argv) -> int:
    """-> 0 (finished) or 75 (stopped early, resumable); a project error raises SystemExit(code)."""
    return errors.run_cli(_train, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
