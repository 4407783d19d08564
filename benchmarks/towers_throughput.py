"""Forward+backward throughput of the ViT and decoder-LM towers (JAX), optionally beside
the same architecture built in Hugging Face transformers (PyTorch), in the same process.

    python benchmarks/towers_throughput.py --tower vit|lm --preset NAME [--batch B] [--seq T]
        [--steps N] [--warmup W] [--threads N] [--dtype float32|bfloat16]
        [--attention default|xla|cudnn] [--compare-torch]
        [--peak_tflops X] [--json-out FILE] [--tiny]

Examples:

    # 2-core CPU, JAX vs PyTorch, same batch / dtype / threads
    python benchmarks/towers_throughput.py --tower vit --preset clip_vit_s16 --batch 8 --threads 2 --compare-torch
    python benchmarks/towers_throughput.py --tower lm --preset gpt2 --batch 4 --seq 128 --threads 2 --compare-torch
    # H100 / H200, bf16, model FLOPs utilisation; cuDNN flash attention vs the XLA path
    python benchmarks/towers_throughput.py --tower vit --preset clip_vit_l14 --batch 128 --dtype bfloat16 --attention cudnn
    python benchmarks/towers_throughput.py --tower lm --preset opt-1.3b --batch 16 --seq 512 --dtype bfloat16 --attention xla
    # smoke test (seconds; what tests/test_benchmarks.py runs)
    python benchmarks/towers_throughput.py --tower vit --tiny --compare-torch

Dimension letters: B batch, S image side, p patch side, C channels, P patches ((S/p)^2),
N tokens per example (P+1 for the ViT, T for the LM), D width, F FFN width, H heads,
L layers, E word-embedding width (OPT-350m), V vocabulary.

What is timed
-------------
One step = ``jax.jit(jax.value_and_grad(loss))(params, batch)`` on random parameters (the
tower's own initialisers) and random inputs, waited for with ``block_until_ready``; the
first ``--warmup`` calls (compilation included) are not timed; the reported ``step_ms`` is
the median of ``--steps`` timed calls (min and max are reported too). Loss: ViT — the mean
of the last-layer features ``[B, N, D]`` (``VisionOutput.features``, HF
``last_hidden_state``); LM — token cross-entropy of ``logits[:, :-1]`` against
``tokens[:, 1:]`` (mean, float32 logits), as HF's ``labels=`` loss. Gradients are taken
with respect to all parameters; no optimizer update. ``dtype`` is the compute dtype
(parameters stay float32, i.e. mixed precision); the PyTorch side matches it with
``torch.autocast(dtype=bfloat16)`` on float32 parameters.

With ``--compare-torch`` the same architecture is built in transformers from a config of
the same sizes (``CLIPVisionModel`` / ``ViTModel`` / ``Blip2VisionModel``;
``GPT2LMHeadModel`` / ``OPTForCausalLM``; dropout 0, random init, eager, default attention
implementation — ``sdpa``), and the two frameworks are timed alternately, one step each
per round, on the same inputs. Parameter counts of both are reported and must agree (a
check that the architectures match). ``ratio`` = JAX throughput / PyTorch throughput
(> 1: JAX faster).

Threads (CPU)
-------------
``--threads N`` must act before jax and torch are imported, so this script parses its
flags first and imports them afterwards. It (1) pins the process to the first N CPUs with
``os.sched_setaffinity`` — XLA:CPU sizes its intra-op thread pool from the schedulable
CPUs (tsl ``port::MaxParallelism``), and this is the one knob that bounds it in jax 0.10:
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=N"`` parses
but leaves the pool (threads named ``tf_XLAEigen``) at the CPU count, while the affinity
mask shrinks it to N; (2) sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and
``torch.set_num_threads(N)`` for PyTorch. The JSON reports ``xla_cpu_pool_threads`` (the
``tf_XLAEigen`` threads counted after the run), and per framework ``cpu_ms`` (median
process CPU time per step) and ``cpu_util`` (CPU seconds / wall seconds over the timed
steps: the parallelism actually obtained, at most N). On a loaded machine ``cpu_ms`` is the
steadier measure, and two-thread OpenMP (PyTorch) suffers most from other processes:
compare frameworks with ``--threads 1`` there.

Model FLOPs (``model_flops_per_step``)
--------------------------------------
Counted analytically from the config (`vit_flops`, `lm_flops`); multiply-add = 2 FLOPs;
elementwise work (norms, activations, softmax) is not counted. Per example, forward:

  ViT:  2*P*(p*p*C)*D                         patch embedding (a p x p stride-p conv)
        + L * [ 2*N*(4*D*D + 2*D*F)           q, k, v, out projections; MLP in and out
                + 4*N*N*D ]                   q k^T and probs @ v (bidirectional, N = P+1)
        + 2*D*D                               dense+tanh pooler (``pool='dense_tanh'`` only)
  LM:   L * [ 2*T*(4*D*D + 2*D*F)
              + 4*D*T*(T+1)/2 ]               causal attention: query t sees t+1 keys
        + 2*T*E*D * 2                         OPT ``project_in``/``project_out`` (E != D only)
        + 2*T*E*V                             LM head (tied embedding, all T positions)

  step = 3 * forward * B                      backward = 2 x forward (standard model-FLOPs
                                              convention; remat recompute is not counted)

The causal term counts only the unmasked keys (T(T+1)/2 per head, not the T^2 that the
PaLM convention and the XLA kernel use; ``--attention-flops full`` switches to T^2), so the
LM's MFU is conservative (by 1-2% at T = 128..512). The ViT patch embedding is counted in
the 3x though its input gradient is never computed (overcounts the step by 0.2% at ViT-B/16,
0.06% at ViT-L/14). `count_dot_flops` counts the
``dot_general``/``conv`` FLOPs of any traced function from its jaxpr; the tests check the
formulas against hand counts and against this independent count.

LM causality: `DecoderLM` applies it in the attention kernel (``is_causal``; no [T, T] mask
array), so on GPU the cuDNN kernel skips the masked key blocks.

MFU = model_flops_per_step / step_time / peak, with peak = ``--peak_tflops`` (default on
GPUs: the measured bf16 matmul ceiling of this project's cards, 683 TFLOP/s for H100 and
652 for H200, see ../shared/design.md; none on CPU, where no MFU is reported).

Host allocator (CPU)
--------------------
Before anything is imported the script applies `vlm_jax.host.tune_malloc` (as ``train.py``
does): glibc keeps freed heap memory instead of returning it to the kernel, so XLA:CPU's
per-step activation buffer does not page-fault afresh on every step. It is process-wide,
so the PyTorch model in the same process gets it too. ``--no-tune-malloc`` measures with
glibc's defaults; the JSON says which (``malloc_tuned``).

Output: one JSON line per measurement (``--json-out FILE`` appends it there too): tower,
preset, batch, seq, dtype, attention, step_ms (+min/max), examples_per_s, tokens_per_s,
model_flops_per_step, tflops, mfu, peak_tflops, params, compile_s, cpu_ms, cpu_util,
threads, xla_cpu_pool_threads, malloc_tuned, device, versions, load_avg (the machine's 1-minute load at the start: the CPU numbers are
only comparable when nothing else runs) and, with ``--compare-torch``, ``torch`` (the same
fields for PyTorch) and ``ratio``. A failed measurement prints ``{"error": ...}`` with the
config and exits 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VIT_PRESETS = ("vit_tiny", "clip_vit_s16", "vit_b16", "clip_vit_b16", "clip_vit_l14", "eva_vit_g14")
LM_PRESETS = ("lm_tiny", "gpt2", "opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b")


# ----------------------------------------------------------------------------- configs
def vit_config(preset: str, **overrides):
    """`ViTConfig` of a preset name. ``vit_tiny``: smoke tests; ``clip_vit_s16``: a
    CLIP-style ViT-S/16 (384 wide, 12 layers, 6 heads, FFN 1536) for 2-core CPU runs."""
    from vlm_jax.layers import vit
    if preset == "vit_tiny":
        return vit.clip_vit_b16(**{**dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                                          num_heads=2, mlp_dim=64), **overrides})
    if preset == "clip_vit_s16":
        return vit.clip_vit_b16(**{**dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
                                   **overrides})
    if preset in ("vit_b16", "clip_vit_b16", "clip_vit_l14", "eva_vit_g14"):
        return getattr(vit, preset)(**overrides)
    raise ValueError(f"--preset {preset!r} is not a ViT preset; use one of {VIT_PRESETS}.")


def lm_config(preset: str, **overrides):
    """`DecoderLMConfig` of a preset name (``lm_tiny``: GPT-2-shaped, for smoke tests)."""
    from vlm_jax.layers.decoder_lm import DecoderLMConfig
    if preset == "lm_tiny":
        return DecoderLMConfig(**{**dict(vocab_size=256, width=32, num_layers=2, num_heads=2, mlp_dim=128,
                                         max_positions=64), **overrides})
    if preset == "gpt2":
        return DecoderLMConfig.gpt2(**overrides)
    if preset.startswith("opt-"):
        return DecoderLMConfig.opt(preset[4:], **overrides)
    raise ValueError(f"--preset {preset!r} is not an LM preset; use one of {LM_PRESETS}.")


# ------------------------------------------------------------------------------- FLOPs
def vit_flops(cfg, batch: int) -> dict:
    """Analytic model FLOPs of a `ViTConfig` (formula in the module docstring).

    Returns dict(forward_per_example, forward, step, patch_embed_per_example, tokens_per_example)."""
    p, c, d, f, n_layers = cfg.patch_size, cfg.num_channels, cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    patches = cfg.num_patches
    n = patches + 1
    patch = 2 * patches * p * p * c * d
    per_layer = 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d
    pooler = 2 * d * d if cfg.pool == "dense_tanh" else 0
    fwd = patch + n_layers * per_layer + pooler
    return dict(forward_per_example=fwd, forward=fwd * batch, step=3 * fwd * batch,
                patch_embed_per_example=patch, tokens_per_example=n)


def lm_flops(cfg, batch: int, seq: int, *, attention_flops: str = "causal") -> dict:
    """Analytic model FLOPs of a `DecoderLMConfig` at ``seq`` tokens (module docstring).

    attention_flops: 'causal' counts T(T+1)/2 query-key pairs per head; 'full' counts T^2
    (the PaLM convention; what the XLA attention kernel actually computes)."""
    if attention_flops not in ("causal", "full"):
        raise ValueError(f"attention_flops={attention_flops!r}; use 'causal' or 'full'.")
    d, f, v, e, n_layers, t = cfg.width, cfg.mlp_dim, cfg.vocab_size, cfg.word_dim, cfg.num_layers, seq
    pairs = t * (t + 1) // 2 if attention_flops == "causal" else t * t
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * d * pairs
    proj = 2 * (2 * t * e * d) if e != d else 0
    head = 2 * t * e * v
    fwd = n_layers * per_layer + proj + head
    return dict(forward_per_example=fwd, forward=fwd * batch, step=3 * fwd * batch, tokens_per_example=t)


def count_dot_flops(fn: Callable, *args, **kwargs) -> int:
    """Dot/conv FLOPs traced in ``fn`` (`vlm_jax.flops.count_dot_flops`, the trainer's counter):
    an independent check of `vit_flops` / `lm_flops` (it counts what is traced, not a formula)."""
    from vlm_jax import flops
    return flops.count_dot_flops(fn, *args, **kwargs)


# -------------------------------------------------------------------------- JAX side
def build_jax(args):
    """-> (step_fn, params, batch_arrays, info) for the JAX tower; step_fn(params, *batch)
    returns (loss, grads)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    impl = None if args.attention == "default" else args.attention
    rng = np.random.default_rng(0)
    if args.tower == "vit":
        from vlm_jax.layers.vit import VisionTransformer
        cfg = vit_config(args.preset, implementation=impl)
        model = VisionTransformer(cfg, dtype=dtype, param_dtype=jnp.float32)
        s = cfg.image_size
        images = jnp.asarray(rng.standard_normal((args.batch, s, s, cfg.num_channels), dtype=np.float32))
        batch = (images,)

        def loss_fn(params, images):
            out = model.apply({"params": params}, images)
            return jnp.mean(out.features.astype(jnp.float32))

        flops = vit_flops(cfg, args.batch)
        init_args = (images[:1],)
    else:
        from vlm_jax.layers.decoder_lm import DecoderLM
        cfg = lm_config(args.preset, implementation=impl)
        if args.seq > cfg.max_positions:
            raise ValueError(f"--seq {args.seq} exceeds the preset's max_positions={cfg.max_positions}.")
        model = DecoderLM(cfg, dtype=dtype, param_dtype=jnp.float32)
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq)), jnp.int32)
        batch = (tokens,)

        def loss_fn(params, tokens):
            logits = model.apply({"params": params}, tokens).logits           # f32 [B, T, V]
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        flops = lm_flops(cfg, args.batch, args.seq, attention_flops=args.attention_flops)
        init_args = (tokens[:1, :min(args.seq, 8)],)

    params = jax.jit(lambda k: nn.unbox(model.init(k, *init_args))["params"])(jax.random.key(0))
    step = jax.jit(jax.value_and_grad(loss_fn))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return step, params, batch, dict(config=cfg, flops=flops, params=n_params)


# ------------------------------------------------------------------------ torch side
def build_torch(args, jax_cfg, batch_np):
    """-> (step_fn() -> loss, info): the same architecture in transformers, same inputs."""
    import torch

    dev = "cuda" if args.on_gpu else "cpu"
    with torch.device(dev):       # initialise on the device (OPT-1.3B on the host takes long)
        model, forward = _torch_model(args, jax_cfg, batch_np, dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    autocast = args.dtype == "bfloat16"

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            loss = forward()
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    attn = getattr(model.config, "_attn_implementation", None)
    return step, dict(params=n_params, attn_implementation=attn)


def _torch_model(args, jax_cfg, batch_np, dev):
    """-> (transformers model, forward() -> scalar loss) for the JAX config ``jax_cfg``."""
    import numpy as np
    import torch
    import transformers as T

    c = jax_cfg
    if args.tower == "vit":
        if c.pre_norm:             # CLIP vision tower
            hf = T.CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.mlp_dim,
                                    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                    image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
                                    hidden_act=c.activation, layer_norm_eps=c.norm_eps, attention_dropout=0.0)
            model = T.CLIPVisionModel(hf)
        elif c.pool == "dense_tanh":   # HF ViTModel with pooler
            hf = T.ViTConfig(hidden_size=c.hidden_size, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
                             num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
                             num_channels=c.num_channels, hidden_act=c.activation, layer_norm_eps=c.norm_eps,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model = T.ViTModel(hf)
        else:                      # EVA ViT-g as BLIP-2 uses it
            hf = T.Blip2VisionConfig(hidden_size=c.hidden_size, intermediate_size=c.mlp_dim,
                                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                     image_size=c.image_size, patch_size=c.patch_size, hidden_act=c.activation,
                                     layer_norm_eps=c.norm_eps, attention_dropout=0.0)
            model = T.Blip2VisionModel(hf)
        inputs = torch.from_numpy(np.array(batch_np[0])).permute(0, 3, 1, 2).contiguous().to(dev)   # NHWC -> NCHW

        def forward():
            return model(pixel_values=inputs).last_hidden_state.float().mean()
    else:
        if c.activation == "gelu_tanh":     # GPT-2
            hf = T.GPT2Config(vocab_size=c.vocab_size, n_embd=c.width, n_layer=c.num_layers, n_head=c.num_heads,
                              n_inner=c.mlp_dim, n_positions=c.max_positions, layer_norm_epsilon=c.norm_eps,
                              activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                              bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1)
            model = T.GPT2LMHeadModel(hf)
        else:                               # OPT
            hf = T.OPTConfig(vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.num_layers,
                             num_attention_heads=c.num_heads, ffn_dim=c.mlp_dim,
                             max_position_embeddings=c.max_positions, word_embed_proj_dim=c.word_dim,
                             do_layer_norm_before=c.norm_position == "pre", dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, layerdrop=0.0, enable_bias=c.use_bias)
            model = T.OPTForCausalLM(hf)
        inputs = torch.from_numpy(np.array(batch_np[0])).long().to(dev)

        def forward():
            return model(input_ids=inputs, labels=inputs).loss

    return model, forward


# ---------------------------------------------------------------------------- driver
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", choices=("vit", "lm"), required=True)
    p.add_argument("--preset", default=None, help=f"vit: {VIT_PRESETS}; lm: {LM_PRESETS}")
    p.add_argument("--batch", type=int, default=None, help="B (default 8 for vit, 4 for lm)")
    p.add_argument("--seq", type=int, default=128, help="T, LM tokens per example")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both frameworks (pins the process to the first N CPUs)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--attention", choices=("default", "xla", "cudnn"), default="default",
                   help="MultiHeadAttention.implementation: default (cuDNN-capable jax.nn.dot_product_attention "
                        "on GPU, the project's XLA path elsewhere), xla, cudnn; see vlm_jax/layers/attention.py")
    p.add_argument("--attention-flops", dest="attention_flops", choices=("causal", "full"), default="causal",
                   help="LM attention FLOPs: T(T+1)/2 (causal, default) or T^2 key pairs")
    p.add_argument("--compare-torch", dest="compare_torch", action="store_true",
                   help="also time the same architecture in transformers/PyTorch, alternating")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="MFU denominator (default: 683 on H100, 652 on H200, none on CPU)")
    p.add_argument("--tiny", action="store_true", help="smoke mode: tiny preset, batch 2, 2 steps")
    p.add_argument("--json-out", dest="json_out", default=None, help="append the JSON line to this file")
    p.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false",
                   help="leave glibc malloc at its defaults (see vlm_jax/host.py; default: tuned, "
                        "for both frameworks, as train.py does)")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = args.preset or ("vit_tiny" if args.tower == "vit" else "lm_tiny")
        args.batch = args.batch or 2
        args.seq = min(args.seq, 16)
        args.steps, args.warmup = min(args.steps, 2), 1
    args.preset = args.preset or ("clip_vit_s16" if args.tower == "vit" else "gpt2")
    args.batch = args.batch or (8 if args.tower == "vit" else 4)
    valid = VIT_PRESETS if args.tower == "vit" else LM_PRESETS
    if args.preset not in valid:
        p.error(f"--preset {args.preset!r} is not a {args.tower} preset; use one of {valid}.")
    for name in ("batch", "steps", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.tower == "lm" and args.seq < 2:
        p.error("--seq must be >= 2 for the next-token loss.")
    if args.attention == "cudnn" and args.dtype != "bfloat16":
        p.error("--attention cudnn needs --dtype bfloat16 (cuDNN flash attention runs in bf16/fp16 only).")
    return args


def limit_threads(n: int | None) -> list[int] | None:
    """Before jax/torch are imported: pin to the first ``n`` allowed CPUs and size the
    OpenMP/MKL pools. Returns the CPU list (None when ``n`` is None)."""
    if n is None:
        return None
    if "jax" in sys.modules or "torch" in sys.modules:
        print("warning: --threads set after jax/torch were imported; their pools may keep their size",
              file=sys.stderr)
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(allowed):
        raise SystemExit(f"--threads {n}: this process may use {len(allowed)} CPUs ({allowed}); "
                         f"choose 1..{len(allowed)}.")
    cpus = allowed[:n]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    return cpus


class _Timer:
    """Wall and process-CPU time of a set of calls."""

    def __init__(self):
        self.times, self.cpu = [], []

    def run(self, fn):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.times.append(dt)
        self.cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
        return out

    def summary(self, examples: int, tokens: int, flops: float, peak: float | None) -> dict:
        med = statistics.median(self.times)
        tflops = flops / med / 1e12
        return dict(step_ms=round(med * 1e3, 6), step_ms_min=round(min(self.times) * 1e3, 6),
                    step_ms_max=round(max(self.times) * 1e3, 6), examples_per_s=round(examples / med, 3),
                    tokens_per_s=round(tokens / med, 1), tflops=round(tflops, 4),
                    mfu=round(tflops / peak, 4) if peak else None,
                    cpu_ms=round(statistics.median(self.cpu) * 1e3, 1),
                    cpu_util=round(sum(self.cpu) / sum(self.times), 2))


def _count_threads(name: str) -> int | None:
    """Threads of this process whose name is ``name`` (Linux /proc); None elsewhere."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    n = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                n += f.read().strip() == name
        except OSError:
            pass
    return n


def _versions(with_torch: bool) -> dict:
    import flax
    import jax
    import jaxlib
    v = dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
             flax=flax.__version__)
    if with_torch:
        import torch
        import transformers
        v.update(torch=torch.__version__, transformers=transformers.__version__)
    return v


def run(args) -> dict:
    """Build, warm up and time; returns the result dict (also printed by `main`)."""
    import jax
    import numpy as np

    dev = jax.devices()[0]
    args.on_gpu = dev.platform == "gpu"
    from vlm_jax.flops import peak_tflops   # measured bf16 matmul ceilings (design.md §4)
    peak = peak_tflops(dev, args.peak_tflops or 0.0)
    if args.attention == "cudnn" and not args.on_gpu:
        raise ValueError(f"--attention cudnn needs an NVIDIA GPU; this run is on {dev.platform}. "
                         "Use --attention default or xla.")

    step, params, batch, info = build_jax(args)
    cfg, flops = info["config"], info["flops"]
    examples = args.batch
    tokens = args.batch * flops["tokens_per_example"]
    torch_step = None
    if args.compare_torch:
        import torch
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        torch_step, torch_info = build_torch(args, cfg, [np.asarray(x) for x in batch])

    def jax_call():
        loss, grads = step(params, *batch)
        jax.block_until_ready(grads)
        return loss

    t0 = time.perf_counter()
    jax_call()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        jax_call()
    if torch_step is not None:
        for _ in range(args.warmup):
            torch_step()
    jt, tt = _Timer(), _Timer()
    for _ in range(args.steps):            # alternate: one step of each per round
        loss = jt.run(jax_call)
        if torch_step is not None:
            tloss = tt.run(torch_step)
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"JAX loss is {float(loss)}; the benchmark inputs produced a non-finite loss.")

    out = dict(tower=args.tower, preset=args.preset, batch=args.batch, seq=flops["tokens_per_example"],
               dtype=args.dtype, attention=args.attention, steps=args.steps,
               **jt.summary(examples, tokens, flops["step"], peak),
               model_flops_per_step=flops["step"],
               attention_flops=args.attention_flops if args.tower == "lm" else "full",
               peak_tflops=peak, params=info["params"], compile_s=round(compile_s, 2), loss=round(float(loss), 4),
               device=f"{jax.device_count()}x {dev.device_kind} ({dev.platform})",
               threads=args.threads if args.threads is not None else len(os.sched_getaffinity(0)),
               cpu_count=os.cpu_count(), load_avg=round(args.load_avg, 2), malloc_tuned=args.malloc["applied"],
               xla_cpu_pool_threads=_count_threads("tf_XLAEigen") if dev.platform == "cpu" else None,
               versions=_versions(torch_step is not None))
    if torch_step is not None:
        t = tt.summary(examples, tokens, flops["step"], peak)
        t.update(params=torch_info["params"], attn_implementation=torch_info["attn_implementation"],
                 loss=round(float(tloss), 4))
        out["torch"] = t
        out["ratio"] = round(t["step_ms"] / out["step_ms"], 3)
        if t["params"] != out["params"]:
            out["warning"] = (f"parameter counts differ (jax {out['params']}, torch {t['params']}): the two "
                              "architectures do not match, so the ratio compares different models.")
    return out


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.load_avg = os.getloadavg()[0]
    limit_threads(args.threads)
    from vlm_jax import host
    args.malloc = host.tune_malloc(args.tune_malloc)
    if args.compare_torch:
        # jax must not take 75% of the GPU up front when torch shares it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        out = run(args)
        code = 0
    except Exception as e:  # one JSON line either way, so a driver script can tabulate failures
        out = dict(tower=args.tower, preset=args.preset, batch=args.batch, seq=args.seq, dtype=args.dtype,
                   attention=args.attention, error=f"{type(e).__name__}: {str(e)[:2000]}")
        code = 1
    line = json.dumps(out)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    if argv is None and code:
        sys.exit(code)
    return out


if __name__ == "__main__":
    main()
