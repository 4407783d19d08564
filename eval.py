"""Evaluate a trained workdir: python eval.py --config configs/sat.py:synthetic --workdir runs/sat [--step N]

Exit codes as train.py's (vlm_jax/errors.py, docs/reliability.md): 0 done, 3-9 a project error
explained in one message on stderr (6: no checkpoint / no such --step), 1 a bug (traceback)."""
import sys

from vlm_jax import host

host.tune_malloc()   # before jax allocates: XLA:CPU step buffers reuse heap pages (vlm_jax/host.py)

from vlm_jax import cli, errors  # noqa: E402


def _evaluate(argv) -> int:
    args, config = cli.parse(argv, "Evaluate a vlm_jax checkpoint.", with_step=True)
    from vlm_jax import eval_lib
    eval_lib.evaluate(config, args.workdir, step=args.step)
    return errors.EXIT_OK


def main(argv) -> int:
    """-> 0; a project error raises SystemExit(code)."""
    return errors.run_cli(_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
