"""Per-turn latency of a multi-image Flamingo dialogue: one decoding session kept across turns
(`vlm_jax.tasks.flamingo.Dialogue`: each turn written to the KV cache once, each new image
encoded and its cross-attention keys/values projected once) beside re-prefilling the whole
conversation every turn (encode every image so far, prefill every token so far, then decode:
what `vlm_jax.generate.generate` does from scratch), in one run.

    python benchmarks/flamingo_dialogue.py [--turns 8] [--text 32] [--reply 16] [--batch 1]
        [--repeats 3] [--threads N]

The model is random (gates set to 0.5 so the images matter), OPT-shaped and CPU-sized: ViT 128
wide, 2 layers, 64 px / 16 px patches; resampler 2 layers, 16 latents; LM 256 wide, 4 layers,
4 heads, MLP 1024, vocabulary 1000 (+2), GATED XATTN-DENSE every 2nd layer. Every turn is
``<image>`` + ``--text`` random tokens; every reply is ``--reply`` greedy tokens (eos disabled
by ``min_new_tokens``, so both paths decode the same number of steps). One untimed pass of the
whole conversation compiles every shape for both paths; then ``--repeats`` timed passes, and per
turn the median wall time of add + reply (dialogue) and of encode + generate (re-prefill),
each waited for with ``block_until_ready``. The replies of the two paths are compared token by
token (the table's last column). Prints the CPU model (or GPU) and the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_common import hardware, limit_threads  # noqa: E402


def build(vocab: int, max_len: int, max_images: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from vlm_jax.layers.decoder_lm import DecoderLMConfig
    from vlm_jax.layers.vit import ViTConfig
    from vlm_jax.models import flamingo as fl
    cfg = fl.FlamingoConfig(
        vision=ViTConfig(image_size=64, patch_size=16, hidden_size=128, num_layers=2, num_heads=4, mlp_dim=512),
        resampler=fl.PerceiverResamplerConfig(width=128, depth=2, num_heads=4, head_dim=32, num_latents=16,
                                              mlp_dim=512, activation="squared_relu"),
        lm=DecoderLMConfig(vocab_size=vocab + 2, width=256, num_layers=4, num_heads=4, mlp_dim=1024,
                           max_positions=max_len),
        xattn=fl.GatedXAttnConfig(num_heads=4, head_dim=64, mlp_dim=1024, activation="squared_relu"),
        xattn_every=2)
    model = fl.Flamingo(cfg)
    import flax.linen as nn
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                              jnp.zeros((1, 1, 64, 64, 3)))["params"]
    rng = np.random.default_rng(0)

    def fill(path, x):        # no jitted init (its RNG program compiles for ~30 s on XLA:CPU)
        name = path[-1].key
        if name.startswith("alpha_"):
            return jnp.full(x.shape, 0.5, x.dtype)
        if name == "scale":
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype)
    return model, jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--text", type=int, default=32, help="text tokens per turn (after its <image>)")
    p.add_argument("--reply", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    limit_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from vlm_jax import generate as gen
    from vlm_jax.tasks.flamingo import Dialogue

    vocab, B, L = 1000, args.batch, args.reply
    img_id, eoc_id, pad_id = vocab, vocab + 1, 0
    max_len = args.turns * (args.text + 1 + L) + 8
    model, params = build(vocab, max_len, args.turns)
    rng = np.random.default_rng(1)
    turns = [np.concatenate([np.full((B, 1), img_id), rng.integers(1, vocab, (B, args.text))], 1).astype(np.int32)
             for _ in range(args.turns)]
    images = rng.normal(size=(B, args.turns, 64, 64, 3)).astype(np.float32)

    @jax.jit
    def from_scratch(p, tokens, seen):          # re-prefill: every image and every token so far
        latents = model.apply({"params": p}, seen, method="encode_images")
        return gen.generate(model, p, tokens, max_new_tokens=L, min_new_tokens=L, eos_id=eoc_id, pad_id=pad_id,
                            prefill_inputs={"latents": latents},
                            row_inputs={"media_valid": jnp.ones(latents.shape[:2], bool)}).tokens[:, 0]

    def dialogue_pass():
        d = Dialogue(model, params, batch_size=B, max_len=max_len, max_images=args.turns, image_id=img_id,
                     eoc_id=eoc_id, pad_id=pad_id)
        times, replies = [], []
        for n, tok in enumerate(turns):
            t = time.perf_counter()
            d.add(tok, images[:, n:n + 1])
            r = d.reply(max_new_tokens=L, min_new_tokens=L)        # host array: waited for
            times.append(time.perf_counter() - t)
            replies.append(r)
        return times, replies

    def reprefill_pass():
        history, times, replies = np.zeros((B, 0), np.int32), [], []
        for n, tok in enumerate(turns):
            history = np.concatenate([history, tok], 1)
            t = time.perf_counter()
            r = np.asarray(jax.block_until_ready(from_scratch(params, jnp.asarray(history),
                                                              jnp.asarray(images[:, :n + 1]))))
            times.append(time.perf_counter() - t)
            replies.append(r)
            history = np.concatenate([history, r], 1)
        return times, replies

    dialogue_pass(), reprefill_pass()                                  # compile every shape
    runs = {"dialogue": [], "reprefill": []}
    for _ in range(args.repeats):
        for name, fn in (("dialogue", dialogue_pass), ("reprefill", reprefill_pass)):
            times, replies = fn()
            runs[name].append(times)
            if name == "dialogue":
                dial_replies = replies
            else:
                same = [bool((a == b).all()) for a, b in zip(dial_replies, replies)]
    med = {k: [statistics.median(r[n] for r in v) for n in range(args.turns)] for k, v in runs.items()}
    print(f"# flamingo_dialogue: {hardware()}, jax {jax.__version__}; batch {B}, "
          f"{args.turns} turns of <image> + {args.text} tokens, {L}-token greedy replies; median of "
          f"{args.repeats} passes after a compile pass")
    print("| turn | context tokens | images | dialogue ms | re-prefill ms | speed-up | replies equal |")
    print("|---|---|---|---|---|---|---|")
    ctx = 0
    for n in range(args.turns):
        ctx += args.text + 1
        a, b = med["dialogue"][n] * 1e3, med["reprefill"][n] * 1e3
        print(f"| {n + 1} | {ctx} | {n + 1} | {a:.1f} | {b:.1f} | {b / a:.2f} | {same[n]} |")
        ctx += L
    ta, tb = sum(med["dialogue"]), sum(med["reprefill"])
    print(f"| all | | | {ta * 1e3:.1f} | {tb * 1e3:.1f} | {tb / ta:.2f} | {all(same)} |")


if __name__ == "__main__":
    main()
