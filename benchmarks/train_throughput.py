"""Train-step throughput of any family's config through the one trainer (examples/s, tokens/s).

    python benchmarks/train_throughput.py --config configs/sat.py:synthetic [--steps 30] [--vocab_size N]
        [--config.key=value ...]

Times the jitted, sharded `train_step` (compilation excluded) on random batches with the
shapes of `Task.example_batch`: float inputs ~ N(0, 1), token ids uniform over the vocabulary
with <bos> first and <eos> last, so every target token counts. With `--vocab_size` the
tokenizer (and hence the dataset) is not needed, which is how the `coco` config is timed
without COCO on disk. Prints one JSON line with the numbers and the machine.
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_jax import host  # noqa: E402

MALLOC = host.tune_malloc()   # as train.py does (VLM_JAX_TUNE_MALLOC=0 to compare without)

import jax  # noqa: E402
import numpy as np

from vlm_jax import config_lib, flops, sharding, train_lib


def random_batch(example: dict, vocab_size: int, rng: np.random.Generator) -> dict:
    out = {}
    for k, v in example.items():
        if np.issubdtype(v.dtype, np.floating):
            out[k] = rng.standard_normal(v.shape).astype(v.dtype)
        elif np.issubdtype(v.dtype, np.integer) and v.ndim == 2:  # token ids [B, T]
            t = rng.integers(4, vocab_size, size=v.shape).astype(v.dtype)
            t[:, 0], t[:, -1] = 1, 2
            out[k] = t
        else:
            out[k] = v
    return out


def main(argv):
    rest, overrides = config_lib.split_config_argv(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab_size", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/vlm_jax_bench")
    args = p.parse_args(rest)
    if args.vocab_size:       # a fixed vocabulary: the task needs no tokenizer (and no dataset)
        overrides = dict(overrides, **{"model.vocab_size": str(args.vocab_size)})
    config = config_lib.load_config(args.config, overrides)
    if args.vocab_size:
        # Throughput only: every parameter random (no dataset, no pretrained weights on disk), so
        # the task's own checks (e.g. SAT refuses to *train* on a frozen random encoder) are skipped
        # and config.init is switched off. Shapes, dtypes and frozen groups stay the config's.
        config.unlock()
        for name in (config.init.keys() if "init" in config else ()):
            config.init[name].source = ""
        config.lock()
        from vlm_jax.tasks import make_task
        shape = config_lib.validate_common(config, jax.device_count(), jax.process_count())
        mesh = sharding.create_mesh(shape)
        task = make_task(config, workdir=None, mesh=mesh)
        task.prepare()
    else:
        task, mesh = train_lib.make_task_and_mesh(config, args.workdir)
    s = train_lib.build_program(config, task, mesh)
    state = s.init_state(jax.random.key(0))
    rng = np.random.default_rng(0)
    example = task.example_batch(config.train.batch_size)
    vocab = args.vocab_size or task.tokenizer.vocab_size
    batches = [sharding.put_batch(random_batch(example, vocab, rng), mesh, s.batch_sharding) for _ in range(4)]
    t0 = time.time()
    for i in range(args.warmup):
        state, metrics = s.train_step(state, batches[i % 4], jax.random.key(1))
    jax.block_until_ready(metrics)
    compile_s = time.time() - t0
    t0 = time.time()
    for i in range(args.steps):
        state, metrics = s.train_step(state, batches[i % 4], jax.random.key(1))
    jax.block_until_ready(metrics)
    dt = (time.time() - t0) / args.steps
    tokens_per_step = float(jax.device_get(metrics.get("num_tokens", 0.0)))
    step_flops = s.step_flops().flops                 # what the trainer logs (vlm_jax/flops.py)
    peak = flops.peak_tflops(jax.devices()[0], float(config.train.get("peak_tflops", 0.0)))
    model_tflops = step_flops / dt / 1e12
    out = {
        "config": args.config, "overrides": overrides, "batch": config.train.batch_size,
        "step_ms": round(dt * 1e3, 2), "examples_per_sec": round(config.train.batch_size / dt, 1),
        "tokens_per_sec": round(tokens_per_step / dt, 1), "warmup_incl_compile_s": round(compile_s, 1),
        "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}", "jax": jax.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": config.train.dtype,
        "malloc_tuned": MALLOC["applied"], "model_flops_per_step": step_flops,
        "model_tflops": round(model_tflops, 4),
        "mfu": round(model_tflops / (peak * jax.device_count()), 4) if peak else None,
        "params": train_lib._count(state.full_params()), "trainable_params": train_lib._count(state.params),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
