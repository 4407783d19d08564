"""BLIP-2 stage-1 train step in vlm_jax beside the PyTorch peer built from transformers' Blip2
modules (``../shared/bench/hf_blip2_stage1.py``), same shapes, threads and device, in one run.

    python benchmarks/blip2_step.py [--preset tiny|vitl] [--batch B] [--steps N] [--warmup W]
        [--threads N] [--peer PATH] [--rounds R] [--no-peer] [--json PATH]

    python benchmarks/blip2_step.py                         # tiny, all schedulable CPUs (~2 min on 2 cores)
    python benchmarks/blip2_step.py --preset vitl           # H100/H200: ViT-L/14 + Q-Former-base, batch 128, bf16

Shapes (as the peer script's presets; T = 32 text tokens, 224 px, 14 px patches, 257 image tokens,
Q-Former vocabulary 30523, cross-attention every 2nd layer, ITC width 256, dropout 0.1 in the
Q-Former as HF's defaults, which the peer keeps in train mode):
  tiny   ViT 64 wide x 2 layers, 4 heads, MLP 128; Q-Former 64 x 2, 4 heads, FFN 128, 8 queries; B 8; float32.
  vitl   ViT-L/14 (1024 x 24, 16 heads, MLP 4096); Q-Former BERT-base (768 x 12, 12 heads, FFN 3072),
         32 queries; B 128; bfloat16 compute (the peer casts the whole model to bf16, AdamW on bf16
         weights; here the frozen ViT is stored in bf16 and the Q-Former keeps f32 master weights).

The step, both sides: frozen ViT forward (no gradient), ITC (max over queries, label smoothing
0.1), one hard-negative image per text and one hard-negative text per image drawn from the ITC
softmax, ITM over 3B pairs, backward, AdamW (lr 1e-4). The peer has no ITG (transformers has no
Q-Former LM head), so vlm_jax is timed twice: ``itc,itm`` (the peer's computation) and
``itc,itm,itg`` (the paper's full step, one more Q-Former pass over B + the LM head). vlm_jax's step
is `vlm_jax.objectives.blip2.stage1_loss` (what the trainer runs) under ``jax.jit`` with the
trainable tree and optimizer state donated, the temperature clamped after the update.

Timing: vlm_jax ``--warmup`` untimed steps (compilation included), then ``--steps`` timed (median,
min, max; ``block_until_ready``). The peer runs as its own process (the shared script, unchanged:
3 warm-up steps, 10 timed, median) with the same CPU affinity and OMP/MKL thread counts, before
and after vlm_jax (``--rounds`` times each), and its median of medians is reported, so drift from
other load on a shared host shows as a spread between its rounds. ``COMPILE=1`` in the
environment makes the peer compile its vision tower (its best configuration on GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)
from bench_common import hardware, limit_threads  # noqa: E402

PRESETS = {
    "tiny": dict(vision=dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128),
                 qformer=dict(width=64, num_layers=2, num_heads=4, mlp_dim=128, num_queries=8),
                 batch=8, dtype="float32"),
    "vitl": dict(vision=dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
                 qformer=dict(width=768, num_layers=12, num_heads=12, mlp_dim=3072, num_queries=32),
                 batch=128, dtype="bfloat16"),
}
TEXT_LEN, IMAGE_SIZE, PATCH, VOCAB, EMBED, DROPOUT, LR = 32, 224, 14, 30523, 256, 0.1, 1e-4
DEFAULT_PEER = os.path.join(ROOT, "..", "shared", "bench", "hf_blip2_stage1.py")
_PEER_LINE = re.compile(r"step median ([\d.]+) ms")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed vlm_jax steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed vlm_jax steps (compilation included)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all schedulable)")
    p.add_argument("--peer", default=os.environ.get("BLIP2_PEER", DEFAULT_PEER),
                   help="path of hf_blip2_stage1.py (default ../shared/bench/, or $BLIP2_PEER)")
    p.add_argument("--rounds", type=int, default=1, help="peer runs before and after vlm_jax, each")
    p.add_argument("--no-peer", action="store_true", help="time only vlm_jax")
    p.add_argument("--json", default=os.environ.get("BLIP2_STEP_JSON", ""), help="append the result as a JSON line")
    a = p.parse_args(argv)
    a.batch = a.batch or PRESETS[a.preset]["batch"]
    if not a.no_peer and not os.path.isfile(a.peer):
        p.error(f"--peer {a.peer}: no such file; pass the path of hf_blip2_stage1.py (on a machine without "
                "../shared, copy it into a git-ignored folder and carry it), or --no-peer.")
    return a


def build(preset: dict, batch: int, objectives: str):
    """-> (jitted step, trainable, opt_state, frozen, batch, raw step fn) for one objective set."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from vlm_jax.layers.vit import ViTConfig, VisionTransformer
    from vlm_jax.models.blip2 import TEMPERATURE_RANGE, Blip2Config, Blip2QFormerModel, QFormerConfig
    from vlm_jax.objectives.blip2 import stage1_loss

    bf16 = preset["dtype"] == "bfloat16"
    cdt = jnp.bfloat16 if bf16 else jnp.float32
    vcfg = ViTConfig(image_size=IMAGE_SIZE, patch_size=PATCH, norm_eps=1e-6, pool="none", **preset["vision"])
    qcfg = QFormerConfig(vocab_size=VOCAB, max_positions=512, cross_attention_every=2, dropout_rate=DROPOUT,
                         attention_dropout_rate=DROPOUT, **preset["qformer"])
    model = Blip2QFormerModel(vision=VisionTransformer(vcfg, dtype=cdt, param_dtype=cdt),
                              config=Blip2Config(qformer=qcfg, embed_dim=EMBED), dtype=cdt)
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.normal(size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)), jnp.float32),
            "tokens": jnp.asarray(rng.integers(3, 30000, size=(batch, TEXT_LEN)), jnp.int32),
            "image_id": jnp.arange(batch, dtype=jnp.int32)}
    params = jax.jit(lambda: model.init(jax.random.key(0), data["image"][:1], data["tokens"][:1],
                                        jnp.ones((1, TEXT_LEN), bool))["params"])()
    import flax.linen as nn
    params = nn.unbox(params)
    frozen = params.pop("vision")
    trainable = params
    tx = optax.adamw(LR)
    opt_state = tx.init(trainable)

    def loss_fn(tr, fr, batch, rng):
        return stage1_loss(model, {**tr, "vision": fr}, batch, rng, dec_id=1, pad_id=0, objectives=objectives,
                           train=True)

    def step(tr, opt_state, fr, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr, fr, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, tr)
        tr = optax.apply_updates(tr, updates)
        tr = dict(tr, temp=jnp.clip(tr["temp"], *TEMPERATURE_RANGE))
        return tr, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), trainable, opt_state, frozen, data, step


def time_ours(preset, batch, objectives, steps, warmup):
    import jax

    from vlm_jax import flops as flops_lib
    step, tr, opt_state, fr, data, raw = build(preset, batch, objectives)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    for i in range(warmup):
        tr, opt_state, loss = step(tr, opt_state, fr, data, jax.random.fold_in(key, i))
    loss.block_until_ready()
    warm_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t = time.perf_counter()
        tr, opt_state, loss = step(tr, opt_state, fr, data, jax.random.fold_in(key, warmup + i))
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    step_flops = flops_lib.count(raw, tr, opt_state, fr, data, key).flops
    n_tr = sum(x.size for x in jax.tree.leaves(tr))
    n_fr = sum(x.size for x in jax.tree.leaves(fr))
    return dict(objectives=objectives, ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
                max_ms=1e3 * max(times), warmup_s=warm_s, loss=float(loss), step_flops=step_flops,
                trainable=int(n_tr), frozen=int(n_fr))


def run_peer(args) -> dict:
    cmd = [sys.executable, args.peer, args.preset, str(args.batch)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    m = _PEER_LINE.search(text)
    if out.returncode or not m:
        raise SystemExit(f"the peer {' '.join(cmd)} failed (exit {out.returncode}):\n{text[-2000:]}")
    return dict(ms=float(m.group(1)), wall_s=time.perf_counter() - t,
                line=[l for l in text.splitlines() if "step median" in l][0].strip(),
                header=[l for l in text.splitlines() if l.startswith("compile=")][0].strip())


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    limit_threads(args.threads)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # the peer shares the GPU
    import jax

    from vlm_jax import flops as flops_lib
    preset = PRESETS[args.preset]
    hw = hardware()
    print(f"# blip2_step preset={args.preset} B={args.batch} T={TEXT_LEN} dtype={preset['dtype']} on {hw} "
          f"(jax {jax.__version__})", flush=True)
    peers = []
    if not args.no_peer:
        for _ in range(args.rounds):
            peers.append(run_peer(args))
            print(f"# peer: {peers[-1]['header']}\n#   {peers[-1]['line']}", flush=True)
    ours = [time_ours(preset, args.batch, obj, args.steps, args.warmup) for obj in ("itc,itm", "itc,itm,itg")]
    if not args.no_peer:
        for _ in range(args.rounds):
            peers.append(run_peer(args))
            print(f"# peer: {peers[-1]['line']}", flush=True)
    peak = flops_lib.peak_tflops(jax.devices()[0])
    peer_ms = statistics.median(p["ms"] for p in peers) if peers else None
    print("\n| step | objectives | ms (median) | min / max | img/s | TFLOP/s | MFU | vs peer |")
    print("|---|---|---|---|---|---|---|---|")
    if peer_ms:
        spread = f"{min(p['ms'] for p in peers):.1f} / {max(p['ms'] for p in peers):.1f} (rounds)"
        print(f"| transformers Blip2 modules (PyTorch) | itc,itm | {peer_ms:.1f} | {spread} | "
              f"{args.batch / peer_ms * 1e3:.1f} | | | 1.00x |")
    rows = []
    for r in ours:
        tflops = r["step_flops"] / (r["ms"] / 1e3) / 1e12
        mfu = tflops / peak if peak else None
        ratio = peer_ms / r["ms"] if peer_ms else None
        rows.append(dict(r, tflops=tflops, mfu=mfu, speedup_vs_peer=ratio, img_per_s=args.batch / r["ms"] * 1e3))
        print(f"| vlm_jax (jax.jit) | {r['objectives']} | {r['ms']:.1f} | {r['min_ms']:.1f} / {r['max_ms']:.1f} | "
              f"{args.batch / r['ms'] * 1e3:.1f} | {tflops:.2f} | {f'{100 * mfu:.1f}%' if mfu else '-'} | "
              f"{f'{ratio:.2f}x' if ratio else '-'} |")
    print(f"\nparameters (vlm_jax): trainable {ours[0]['trainable']:,}, frozen ViT {ours[0]['frozen']:,}; "
          f"first-compile + warm-up {ours[0]['warmup_s']:.1f} s / {ours[1]['warmup_s']:.1f} s; "
          f"MFU denominator {f'{peak} TFLOP/s (measured bf16 ceiling)' if peak else '- (CPU)'}; FLOPs = dot/conv "
          f"of the traced step")
    result = dict(preset=args.preset, batch=args.batch, hardware=hw, peer_ms=peer_ms,
                  peer_rounds=[p["ms"] for p in peers], ours=rows, peak_tflops=peak)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
