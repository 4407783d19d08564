"""One Flamingo training step in vlm_jax beside HF ``IdeficsForVisionText2Text`` (PyTorch) on the
same architecture, weights, batch and threads, in one process.

    python benchmarks/flamingo_step.py [--preset cpu|gpu1b] [--steps N] [--warmup W] [--threads N]
        [--batch B] [--images M] [--seq T] [--no-torch] [--dry-run]

    python benchmarks/flamingo_step.py                       # cpu preset, all schedulable CPUs (< 3 min on 2 cores)
    python benchmarks/flamingo_step.py --preset gpu1b        # H100/H200: ~1B LLaMA-style LM, bf16
    python benchmarks/flamingo_step.py --preset gpu1b --dry-run   # shapes and parameter counts only

The step (both frameworks): frozen CLIP-style ViT -> trainable Perceiver Resampler -> frozen
LLaMA-style LM (rotary, RMSNorm, SwiGLU) with trainable GATED XATTN-DENSE blocks before every
``cross_layer_interval``-th layer (IDEFICS layout, ``xattn_offset=0``) and trainable extra token
rows (``<fake_token_around_image>``, ``<image>``: ``extra_embed`` / ``extra_lm_head``, HF's
``additional_embedding`` / ``additional_fc``); loss = mean next-token cross-entropy over all
T-1 positions and V + 2 logits; gradients of the trainable parameters only; AdamW (lr 1e-4,
weight decay 0.01) on them.
  vlm_jax: ``jax.jit`` of value_and_grad(loss)(trainable, frozen, batch) + optax.adamw update
    (frozen parameters are a non-differentiated argument; buffers donated).
  HF: ``IdeficsForVisionText2Text`` with ``freeze_text_layers`` / ``freeze_vision_layers`` /
    ``freeze_lm_head`` (requires_grad False on the vision tower, the LM layers, norm, the V-row
    token table and head), eager module calls, default attention (sdpa); forward, ``backward()``,
    ``torch.optim.AdamW.step()``, ``zero_grad(set_to_none=True)``. The loss is computed here with
    ``F.cross_entropy`` on the logits: HF's ``labels=`` path views the V + X logits as
    ``[-1, vocab_size=V]``, which fails when ``additional_vocab_size > 0``.
The JAX model is imported from the HF model's own state dict (`vlm_jax.convert.idefics`), so both
start from identical weights (the gates set to 0.1, not HF's 0, so every trainable weight gets a
gradient); the first step's losses are printed side by side as a check that the two compute the
same thing. Parameter counts of both are printed (ours has one extra trainable
``resampler/time_embed [1, Dv]``, zero for IDEFICS).

Timing: ``--warmup`` untimed steps per framework (JAX compilation included), then ``--steps``
rounds alternating one JAX step and one torch step; per framework the median, min and max wall
time of a step (JAX waited for with ``block_until_ready``, CUDA with ``synchronize``).
Threads (CPU): ``--threads N`` pins the process to N CPUs (``os.sched_setaffinity``, which bounds
XLA:CPU's pool; see benchmarks/towers_throughput.py) and sets ``torch.set_num_threads(N)`` and
OMP/MKL to N, before jax and torch are imported, and ``OMP_WAIT_POLICY=PASSIVE`` unless set:
on a shared, loaded host spinning OpenMP workers are descheduled and a 2-thread torch matmul
ran 40x slower than a 1-thread one (16 ms vs 0.4 ms at 256x256). The table names the CPU model
(/proc/cpuinfo) and the header the load average at the start.

Presets (B batch, M images per row, T tokens; every row holds M ``<fake><image><fake>`` groups):
  cpu    LM 256 wide, 4 layers, 4 heads, SwiGLU 688, vocab 1000 (+2), xattn every 2 (2 blocks);
         vision 128 wide, 2 layers, 4 heads, MLP 512, 64 px / 16 px patches (17 tokens);
         resampler 2 layers, 16 latents, 4 heads x 32; B 4, M 2, T 64; float32.
  gpu1b  LM 2048 wide, 16 layers, 16 heads, SwiGLU 5632, vocab 32000 (+2) (~0.95B, TinyLlama-like),
         xattn every 4 (4 blocks); vision ViT-L/14 at 224 px (1024 wide, 24 layers); resampler
         6 layers, 64 latents, 16 heads x 64; B 8, M 2, T 512. Compute bfloat16: frozen towers
         stored in bf16 (and the 2 extra embedding rows, which HF's decoupled embedding writes into
         the frozen table's dtype), trainable parameters and optimizer state float32; torch runs
         under ``torch.autocast(bfloat16)`` on CUDA.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_model, limit_threads  # noqa: E402

PRESETS = {
    "cpu": dict(
        lm=dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688,
                cross_layer_interval=2),
        vision=dict(embed_dim=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, image_size=64,
                    patch_size=16),
        perceiver=dict(resampler_depth=2, resampler_n_latents=16, resampler_n_heads=4, resampler_head_dim=32),
        batch=4, images=2, seq=64, dtype="float32"),
    "gpu1b": dict(
        lm=dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                intermediate_size=5632, cross_layer_interval=4),
        vision=dict(embed_dim=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    image_size=224, patch_size=14),
        perceiver=dict(resampler_depth=6, resampler_n_latents=64, resampler_n_heads=16, resampler_head_dim=64),
        batch=8, images=2, seq=512, dtype="bfloat16"),
}
GATE = 0.1
LR, WD = 1e-4, 0.01


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework (compilation included)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all schedulable)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--no-torch", action="store_true", help="time only the JAX step")
    p.add_argument("--dry-run", action="store_true", help="print shapes and parameter counts, run nothing")
    a = p.parse_args(argv)
    pre = PRESETS[a.preset]
    for k in ("batch", "images", "seq"):
        if getattr(a, k) is None:
            setattr(a, k, pre[k])
    if a.seq < 3 * a.images + 2:
        p.error(f"--seq {a.seq} is too short for {a.images} <fake><image><fake> groups.")
    return a


def hf_config(preset: dict):
    import transformers
    lm = preset["lm"]
    return transformers.IdeficsConfig(
        **lm, additional_vocab_size=2, use_resampler=True, alpha_type="float", qk_layer_norms=False,
        max_position_embeddings=max(2048, 2 * preset["seq"]), tie_word_embeddings=False, dropout=0.0,
        freeze_text_layers=True, freeze_vision_layers=True, freeze_lm_head=True,
        vision_config=dict(preset["vision"], hidden_act="gelu", num_channels=3),
        perceiver_config=dict(preset["perceiver"], qk_layer_norms_perceiver=False))


def make_batch(cfg, batch, images, seq, seed=0):
    """tokens int [B, T] with M ``<fake><image><fake>`` groups per row (the first after 3 text
    tokens, so some text sees no image), images float [B, M, S, S, 3]."""
    import numpy as np
    rng = np.random.default_rng(seed)
    v = cfg.vocab_size
    fake, img = v, v + 1
    tokens = rng.integers(3, v, size=(batch, seq))
    starts = [3 + j * (seq - 3) // images for j in range(images)]
    for s in starts:
        tokens[:, s:s + 3] = (fake, img, fake)
    side = cfg.vision_config.image_size
    pixels = rng.normal(size=(batch, images, side, side, 3)).astype(np.float32)
    return tokens.astype(np.int64), pixels


def build_torch(cfg, device, bf16):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(cfg)
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.fill_(GATE)
            layer.alpha_dense.fill_(GATE)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    if bf16:     # frozen parts (+ the additional embedding rows: written into the frozen table) in bf16
        for mod in (model.model.vision_model, model.model.layers, model.model.norm, model.model.embed_tokens):
            mod.to(torch.bfloat16)
        model.lm_head.weight.data = model.lm_head.weight.data.to(torch.bfloat16)
    model.to(device).train()
    return model, state


def build_jax(cfg_dict, state, dtype_name):
    import jax
    import jax.numpy as jnp
    import optax

    from vlm_jax import optim
    from vlm_jax.convert import common, conversion_for
    from vlm_jax.models import flamingo

    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    conv = conversion_for(cfg_dict, state.keys(), architecture="IdeficsForVisionText2Text", dtype=dtype)
    params = common.convert(conv, state)["params"]
    model = conv.module
    groups = flamingo.param_groups()
    labels = optim.assign_groups(params, [], groups)
    table = optim.group_table([], groups)
    trainable, frozen = optim.split(params, jax.tree.map(lambda l: table[l].trainable, labels))
    store = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    frozen = jax.tree.map(store, frozen)
    if dtype == jnp.bfloat16:     # as the torch side: the extra embedding rows follow the frozen table
        trainable["extra_embed"] = jax.tree.map(store, trainable["extra_embed"])
    trainable = jax.tree.map(jnp.asarray, trainable)
    tx = optax.adamw(LR, weight_decay=WD)
    opt_state = tx.init(trainable)

    def loss_fn(tr, fr, tokens, images):
        logits = model.apply({"params": optim.merge(tr, fr)}, tokens, images).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    def step(tr, opt_state, fr, tokens, images):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, tokens, images)
        updates, opt_state = tx.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), trainable, opt_state, frozen, model, step


def count(tree) -> int:
    import jax
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = limit_threads(args.threads)
    preset = PRESETS[args.preset]
    # both frameworks share one GPU: no up-front reservation of 75% of its memory by XLA
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    import jax
    import jax.numpy as jnp

    cfg = hf_config(preset)
    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if torch.cuda.is_available() and on_gpu else "cpu"
    bf16 = preset["dtype"] == "bfloat16"
    tokens, pixels = make_batch(cfg, args.batch, args.images, args.seq)
    hw = f"GPU {jax.devices()[0].device_kind}" if on_gpu else f"CPU {cpu_model()}, {threads} threads"
    print(f"# flamingo_step preset={args.preset} B={args.batch} M={args.images} T={args.seq} "
          f"dtype={preset['dtype']} on {hw} (jax {jax.__version__}, torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load avg {os.getloadavg()[0]:.1f})")
    if args.dry_run:
        from vlm_jax.convert.idefics import idefics_config
        import flax.linen as nn

        from vlm_jax import optim
        from vlm_jax.models import flamingo
        fc = idefics_config(cfg.to_dict())
        print(fc)
        s = fc.vision.image_size
        shapes = nn.unbox(jax.eval_shape(flamingo.Flamingo(fc).init, jax.random.key(0),
                                         jax.ShapeDtypeStruct((1, 8), jnp.int32),
                                         jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.float32))["params"])
        labels = optim.assign_groups(shapes, [], flamingo.param_groups())
        sizes = {}
        for (_, x), (_, lab) in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                    jax.tree_util.tree_leaves_with_path(labels)):
            sizes[lab] = sizes.get(lab, 0) + x.size
        print("# parameters by group:", {k: f"{v:,}" for k, v in sorted(sizes.items())})
        return sizes

    t0 = time.perf_counter()
    model, state = build_torch(cfg, device, bf16)
    step, trainable, opt_state, frozen, _, raw_step = build_jax(cfg.to_dict(), state, preset["dtype"])
    del state
    print(f"# built both in {time.perf_counter() - t0:.1f}s")
    jt, ji = jnp.asarray(tokens, jnp.int32), jnp.asarray(pixels)

    tparams = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(tparams, lr=LR, weight_decay=WD)
    ids = torch.tensor(tokens, device=device)
    px = torch.tensor(pixels.transpose(0, 1, 4, 2, 3), device=device)          # [B, M, C, H, W]
    marker = np.cumsum(tokens == cfg.vocab_size + 1, axis=1)
    iam = torch.tensor((marker[..., None] == np.arange(1, args.images + 1)).astype(np.int64), device=device)
    am = torch.ones_like(ids)
    nv = cfg.vocab_size + cfg.additional_vocab_size

    def torch_step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=am, pixel_values=px, image_attention_mask=iam,
                           use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, nv), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    state = dict(tr=trainable, opt=opt_state)

    def jax_step():
        state["tr"], state["opt"], loss = step(state["tr"], state["opt"], frozen, jt, ji)
        return float(jax.block_until_ready(loss))

    runs = [("vlm_jax (JAX, jit)", jax_step)] + ([] if args.no_torch else [("HF IDEFICS (torch)", torch_step)])
    first, times = {}, {name: [] for name, _ in runs}
    for name, fn in runs:
        t = time.perf_counter()
        first[name] = fn()
        for _ in range(args.warmup - 1):
            fn()
        print(f"# {name}: warmup {args.warmup} steps in {time.perf_counter() - t:.1f}s, first loss {first[name]:.6f}")
    for _ in range(args.steps):
        for name, fn in runs:
            t = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t))

    from vlm_jax import flops as flops_lib     # dot/conv FLOPs of the traced step (not run) -> TFLOP/s, MFU
    step_flops = flops_lib.count(raw_step, state["tr"], state["opt"], frozen, jt, ji).flops
    peak = flops_lib.peak_tflops(jax.devices()[0])
    tflops = step_flops / (statistics.median(times["vlm_jax (JAX, jit)"]) / 1e3) / 1e12
    jax_total = count(state["tr"]) + count(frozen)
    counts = {"vlm_jax (JAX, jit)": (jax_total, count(state["tr"])),
              "HF IDEFICS (torch)": (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in tparams))}
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"\n| framework | ms/step (median of {args.steps}) | min | max | params total | trainable | first loss |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in runs:
        t = times[name]
        tot, tr = counts[name]
        print(f"| {name} | {med[name]:.1f} | {min(t):.1f} | {max(t):.1f} | {tot:,} | {tr:,} | {first[name]:.5f} |")
    mfu = tflops / peak if peak else None
    print(f"\nvlm_jax step: {step_flops:.3e} FLOPs (dot/conv, traced), {tflops:.2f} TFLOP/s, "
          f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else '- (no known peak for this device)'}"
          f"{f' of {peak} TFLOP/s' if peak else ''}")
    out = dict(preset=args.preset, hardware=hw, ms=med, first_loss=first, step_flops=step_flops, tflops=tflops,
               mfu=mfu, peak_tflops=peak)
    if not args.no_torch:
        ratio = med["HF IDEFICS (torch)"] / med["vlm_jax (JAX, jit)"]
        print(f"\nratio torch/JAX = {ratio:.2f} (> 1: vlm_jax faster); |first loss diff| = "
              f"{abs(first['vlm_jax (JAX, jit)'] - first['HF IDEFICS (torch)']):.2e}")
        out["ratio"] = ratio
    return out


if __name__ == "__main__":
    import json
    result = main()
    if os.environ.get("FLAMINGO_STEP_JSON"):
        with open(os.environ["FLAMINGO_STEP_JSON"], "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
