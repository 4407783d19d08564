"""Compiled train-step temporary memory and step time of one `TransformerStack` under each
remat policy (`vlm_jax.layers.transformer.REMAT_POLICIES`), scanned and unrolled.

    python benchmarks/remat_memory.py [--layers 12 --width 256 --heads 4 --mlp 1024 --batch 8 --length 128]

For every (policy, scan) pair: ``temp MiB`` = ``jax.jit(grad).lower(...).compile()
.memory_analysis().temp_size_in_bytes`` of the forward+backward of ``sum(out**2)``
(what the backward keeps alive besides arguments and outputs), and the median wall time of
5 steps after one warm-up. Shapes: x ``[B, T, D]``, L pre-LN GELU blocks.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.transformer import REMAT_POLICIES, BlockConfig, TransformerStack


def measure(policy: str, scan: bool, a) -> tuple[float, float]:
    cfg = BlockConfig(num_heads=a.heads, head_dim=a.width // a.heads, mlp_dim=a.mlp, activation="gelu")
    st = TransformerStack(cfg, a.layers, scan_layers=scan, remat_policy=policy)
    x = jax.random.normal(jax.random.key(1), (a.batch, a.length, a.width))
    params = jax.jit(lambda: nn.unbox(st.init(jax.random.key(0), x)["params"]))()
    grad = jax.jit(jax.grad(lambda p, x: (st.apply({"params": p}, x)[0] ** 2).sum()))
    temp = grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes / 2 ** 20
    jax.block_until_ready(grad(params, x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params, x))
        times.append(time.perf_counter() - t0)
    return temp, 1e3 * float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    a = ap.parse_args()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); L={a.layers} D={a.width} H={a.heads} "
          f"F={a.mlp} B={a.batch} T={a.length}, float32")
    print("| remat_policy | scan_layers | temp MiB | step ms |")
    print("|---|---|---|---|")
    for policy in REMAT_POLICIES:
        for scan in (False, True):
            temp, ms = measure(policy, scan, a)
            print(f"| {policy} | {scan} | {temp:.1f} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
