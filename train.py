"""Train (and finally evaluate) a model: python train.py --config configs/sat.py:synthetic --workdir runs/sat"""
import sys

from vlm_jax import host

host.tune_malloc()   # before jax allocates: XLA:CPU step buffers reuse heap pages (vlm_jax/host.py)

from vlm_jax import cli, config_lib  # noqa: E402
from vlm_jax.init_sources import InitSourceError  # noqa: E402


def main(argv):
    args, config = cli.parse(argv, "Train a vlm_jax model, then evaluate it.")
    from vlm_jax import train_lib
    try:
        train_lib.train_and_evaluate(config, args.workdir)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")
    except InitSourceError as e:
        sys.exit(f"init error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
