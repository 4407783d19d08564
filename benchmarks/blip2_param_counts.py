"""Parameter counts of the paper-size BLIP-2 models (jax.eval_shape: nothing is allocated).

  python benchmarks/blip2_param_counts.py

Stage 1: EVA ViT-g/14 without its last block (39 blocks, 224 px) + the BERT-base Q-Former (32
queries, [DEC] in the vocabulary, ITG LM head) + ITC/ITM heads. Stage 2: the same image side +
Q-Former + language projection + OPT-2.7B or Flan-T5-XL (their Hugging Face config.json shapes).
Trainable = everything outside the frozen image encoder (and the frozen LM in stage 2), as the
tasks' parameter groups set it (vlm_jax/tasks/blip2.py).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlm_jax.layers.decoder_lm import DecoderLMConfig  # noqa: E402
from vlm_jax.layers.t5 import T5Config  # noqa: E402
from vlm_jax.layers.vit import VisionTransformer, eva_vit_g14  # noqa: E402
from vlm_jax.models import blip2  # noqa: E402

OPT_2_7B = DecoderLMConfig(vocab_size=50272, width=2560, num_layers=32, num_heads=32, mlp_dim=10240,
                           max_positions=2048, position_offset=2, activation="relu", norm_position="pre")
FLAN_T5_XL = T5Config(vocab_size=32128, width=2048, num_heads=32, head_dim=64, mlp_dim=5120, num_layers=24,
                      activation="gated_gelu", tie_lm_head=False)


def counts(module, *args) -> dict[str, int]:
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(shapes["params"]))
    out: dict[str, int] = {}
    for k, v in flat.items():
        out[k[0]] = out.get(k[0], 0) + int(np.prod(v.shape))
    return out


def main():
    vit = VisionTransformer(eva_vit_g14())
    images = jnp.zeros((1, 224, 224, 3))
    tokens = jnp.ones((1, 8), jnp.int32)
    rows = []
    s1 = counts(blip2.Blip2QFormerModel(vit, blip2.Blip2Config(qformer=blip2.QFormerConfig.paper())), images, tokens,
                jnp.ones((1, 8), bool))
    frozen = s1["vision"]
    rows.append(("stage 1 (EVA ViT-g + Q-Former)", sum(s1.values()), sum(s1.values()) - frozen, frozen,
                 s1["qformer"]))
    for name, lm in (("stage 2, OPT-2.7B", OPT_2_7B), ("stage 2, Flan-T5-XL", FLAN_T5_XL)):
        cfg = blip2.Blip2LMConfig(lm=lm, qformer=blip2.QFormerConfig.paper())
        c = counts(blip2.Blip2LMModel(vit, cfg), images, tokens)
        frozen = c["vision"] + c["lm"]
        rows.append((name, sum(c.values()), sum(c.values()) - frozen, frozen, c["qformer"]))
    print("| model | total | trainable | frozen | of which Q-Former |")
    print("|---|---|---|---|---|")
    for name, total, train, frz, q in rows:
        print(f"| {name} | {total / 1e6:,.1f}M | {train / 1e6:,.1f}M | {frz / 1e6:,.1f}M | {q / 1e6:,.1f}M |")


if __name__ == "__main__":
    main()
