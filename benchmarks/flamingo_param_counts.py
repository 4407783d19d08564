"""Parameter counts of the paper-shaped Flamingo layouts (jax.eval_shape: nothing is allocated),
beside the paper's figures (Alayrac et al. 2022, Table 5).

  python benchmarks/flamingo_param_counts.py            # a markdown table

The layouts are configs/flamingo.py:paper_3b and :paper_9b, built through the task's own
`vlm_jax.tasks.flamingo.model_config` and split by the model's parameter groups (frozen vision,
frozen LM; the rest trainable). Their deviations from the paper (a ViT for NFNet-F6, an OPT-shaped
decoder for Chinchilla, the 9B LM depth assumed) are in configs/flamingo.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# The paper's Table 5, in parameters: frozen vision, frozen LM, trainable resampler, trainable
# GATED XATTN-DENSE, total.
PAPER = {
    "paper_3b": dict(vision=435e6, lm=1.4e9, resampler=194e6, xattn=1.2e9, total=3.2e9),
    "paper_9b": dict(vision=435e6, lm=7.1e9, resampler=194e6, xattn=1.6e9, total=9.3e9),
}


def counts(variant: str) -> dict[str, int]:
    """{'vision', 'lm', 'resampler', 'xattn', 'other_trainable', 'total', 'trainable', 'frozen'}."""
    from vlm_jax import config_lib
    from vlm_jax.models import flamingo
    from vlm_jax.tasks.flamingo import model_config
    config = config_lib.load_config(f"configs/flamingo.py:{variant}")
    fc = model_config(config, vocab_size=int(config.model.lm.vocab_size), max_positions=0)
    s = fc.vision.image_size
    shapes = nn.unbox(jax.eval_shape(flamingo.Flamingo(fc).init, jax.random.key(0),
                                     jax.ShapeDtypeStruct((1, 8), jnp.int32),
                                     jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.float32))["params"])
    out = dict(vision=0, lm=0, resampler=0, xattn=0, other_trainable=0)
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        keys = [str(getattr(k, "key", k)) for k in path]
        name = "/".join(keys)
        if keys[0] == "vision":
            out["vision"] += x.size
        elif keys[0] == "resampler":
            out["resampler"] += x.size
        elif keys[0] == "lm" and "/inserted_" in "/" + name:
            out["xattn"] += x.size
        elif keys[0] == "lm":
            out["lm"] += x.size
        else:                                   # media_proj, extra_embed (<image>, <|endofchunk|>)
            out["other_trainable"] += x.size
    out["trainable"] = out["resampler"] + out["xattn"] + out["other_trainable"]
    out["frozen"] = out["vision"] + out["lm"]
    out["total"] = out["trainable"] + out["frozen"]
    return out


def main():
    rows = ("vision", "lm", "resampler", "xattn", "total")
    print("| layout | " + " | ".join(f"{r} (ours / paper)" for r in rows) + " | trainable | frozen |")
    print("|---|" + "---|" * (len(rows) + 2))
    for variant in PAPER:
        c, p = counts(variant), PAPER[variant]
        cells = [f"{c[r] / 1e6:,.0f}M / {p[r] / 1e6:,.0f}M ({c[r] / p[r] - 1:+.1%})" for r in rows]
        print(f"| {variant} | " + " | ".join(cells) + f" | {c['trainable'] / 1e6:,.0f}M | {c['frozen'] / 1e6:,.0f}M |")


if __name__ == "__main__":
    main()
