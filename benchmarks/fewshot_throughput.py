"""Few-shot scoring throughput of a trained Flamingo workdir, with and without the shared-prefix
KV cache (`vlm_jax.evaluation.fewshot.score_classes_cached` / `score_classes_full`), in one run.

    python benchmarks/fewshot_throughput.py --config configs/flamingo.py:synthetic,lm=runs/flamingo_lm \\
        --workdir runs/flamingo [--shots 4,16] [--episodes 64] [--repeats 3]

Reads the latest checkpoint; writes nothing into the workdir. For each shot count: the same
prompts (random demonstrations, one trial) scored both ways; prints examples/s (median over
``--repeats`` passes after one compile pass), the largest |difference| between the two score
matrices and the accuracy, with the CPU model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--shots", default="4,16")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    args, rest = p.parse_known_args(argv)
    import os
    import jax
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import restore_run
    _, task, step, state = restore_run(args.config, args.workdir, rest)
    from vlm_jax.evaluation import fewshot
    params = state.full_params()
    episodes = task.make_episodes(0, args.episodes)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"# fewshot_throughput {args.workdir} step {step}, {args.episodes} episodes x {len(episodes[0].class_names)} "
          f"classes, batch {args.batch}, CPU {cpu}, {os.cpu_count()} cores, jax {jax.__version__}")
    print("| shots | cached ex/s | full ex/s | speed-up | max |score diff| | accuracy |")
    print("|---|---|---|---|---|---|")
    for k in [int(s) for s in args.shots.split(",")]:
        rng = np.random.default_rng(k)
        prompts = [fewshot.episode_prompt(e, k, task.tokenizer, image_id=task.image_id, eoc_id=task.eoc_id,
                                          method="random", rng=rng) for e in episodes]
        rate, scores = {}, {}
        for name, fn in (("cached", fewshot.score_classes_cached), ("full", fewshot.score_classes_full)):
            fn(task.model, params, prompts, batch_size=args.batch, pad_id=task.tokenizer.pad_id)   # compile
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                scores[name] = fn(task.model, params, prompts, batch_size=args.batch, pad_id=task.tokenizer.pad_id)
                times.append(time.perf_counter() - t)
            rate[name] = len(prompts) / statistics.median(times)
        acc = fewshot.accuracy_from_scores(scores["cached"], np.array([e.label for e in episodes]))
        diff = float(np.max(np.abs(scores["cached"] - scores["full"])))
        print(f"| {k} | {rate['cached']:.1f} | {rate['full']:.1f} | {rate['cached'] / rate['full']:.2f} | "
              f"{diff:.1e} | {acc:.3f} |")


if __name__ == "__main__":
    main()
