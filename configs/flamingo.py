"""Flamingo (Alayrac et al. 2022) configs: a frozen image encoder, a Perceiver Resampler and
GATED XATTN-DENSE blocks inserted into a frozen decoder LM, trained on a mixture of image-text
pairs and interleaved documents.

Variants (`--config configs/flamingo.py:VARIANT[,key=value,...]`):
  tiny          seconds; what the tests use (both stages: ``model.stage=lm`` / ``flamingo``).
  lm_synthetic  stage 0 (``model.stage='lm'``): no pretrained LM exists offline, so the small
                decoder LM that Flamingo keeps frozen is first trained text-only on the
                synthetic set's captions and on the text form of the nonce episodes ("this is a
                red dax ... this is a red" -> dax), which teaches it in-context copying.
  synthetic     Flamingo on the synthetic set from that LM (``lm=<stage-0 workdir>``): the LM
                (and the random ViT, frozen as the paper's NFNet) stay frozen; the resampler,
                the gated blocks and the ``<image>`` / ``<|endofchunk|>`` rows train on the
                mixture pairs (lambda 1) + synthetic interleaved documents (1) + nonce-word
                episodes (1). Evaluators: few-shot nonce classification (0/4/8/16 shots,
                random, RICES and balanced (N-way K-shot) selection, 3 trials) and captioning.

  paper_3b / paper_9b
                the paper's Flamingo-3B / -9B layouts (Alayrac et al. 2022, Tables 4-5): a shape
                reference (benchmarks/flamingo_param_counts.py counts it with jax.eval_shape;
                training it is refused: no Chinchilla / NFNet-F6 weights nor M3W data exist
                offline). Deviations, named: the NFNet-F6 image encoder is stood in for by a ViT of
                the resampler's width (1536) and about its size (15 layers: 0.43B vs 0.435B); the
                Chinchilla LMs by the OPT-shaped decoder (learned positions, tied head, 32k vocab);
                the 9B LM's depth (32 layers of width 4096, a 7B-class shape) is assumed, not read
                from the paper, so its cross-attention count (every 4th layer: 8 blocks) is too.

Shortcuts inside the arg: ``lm=<workdir>`` seeds ``lm`` (and the frozen ``vision``, so both
stages share one random image tower) from that stage-0 run's final checkpoint.

Commands:
  python train.py --config configs/flamingo.py:lm_synthetic --workdir runs/flamingo_lm
  python train.py --config configs/flamingo.py:synthetic,lm=runs/flamingo_lm --workdir runs/flamingo
  python eval.py  --config configs/flamingo.py:synthetic,lm=runs/flamingo_lm --workdir runs/flamingo
"""
import ml_collections

from vlm_jax import config_lib

VARIANTS = ("tiny", "lm_synthetic", "synthetic", "paper_3b", "paper_9b")


def get_config(arg=None):
    variant, overrides = config_lib.parse_arg(arg, VARIANTS, default="synthetic")
    c = ml_collections.ConfigDict()
    c.task = "flamingo"
    c.variant = variant
    c.seed = 0

    # ---------------------------------------------------------------- data
    c.data = d = config_lib.caption_data(image_size=32, max_caption_len=24)
    # The mixture: one batch of every source per step, loss = sum_s weight_s * loss_s (the paper's lambda).
    c.data.mixture = mix = ml_collections.ConfigDict()
    mix.pairs = ml_collections.ConfigDict(dict(weight=1.0, batch_size=32))       # <image> caption <eoc>
    mix.docs = ml_collections.ConfigDict(dict(weight=1.0, batch_size=16))        # 1..M images with captions
    mix.nonce = ml_collections.ConfigDict(dict(weight=1.0, batch_size=32))       # nonce-word episodes
    # question-answer documents in the VQA prompt (<image> Question:{q} Short answer:{a} <eoc>): stage 0
    # reads them as text (lm_synthetic); the paper's Flamingo is not trained on VQA, so 0 here
    mix.qa = ml_collections.ConfigDict(dict(weight=0.0, batch_size=16))
    mix.mmc4 = ml_collections.ConfigDict(dict(weight=0.0, batch_size=16))        # MMC4-format web documents
    # Local MMC4-format documents (vlm_jax/data/mmc4.py): *.jsonl + images/ in manual_dir; an image is
    # used when its CLIP similarity to its matched sentence is >= threshold.
    d.mmc4 = ml_collections.ConfigDict(dict(manual_dir="", threshold=0.24))
    d.max_images = 4                   # M: images per interleaved document
    d.max_tokens = 96                  # T: tokens per interleaved document (pairs: max_caption_len + 4)
    d.num_docs = 20000                 # synthetic documents / episodes per epoch (indices; drawn per index)
    d.nonce_way = 4                    # colours bound to nonce words per episode (chance 1/4)
    d.nonce_words = 40                 # size of the nonce-word pool
    d.nonce_shots = 8                  # chunks per training episode (their own media slots)
    d.qa_template = "Question:{} Short answer:{}"   # the 'qa' source's text and the few-shot VQA prompt (open_flamingo's)

    # ---------------------------------------------------------------- model
    c.model = m = ml_collections.ConfigDict()
    m.stage = "flamingo"               # 'lm' (stage 0: text-only LM) | 'flamingo'
    m.vision = ml_collections.ConfigDict(dict(patch_size=4, width=64, num_layers=2, num_heads=4, mlp_dim=128))
    m.feature_layer = -1
    m.vision_tokens = "patches"
    m.resampler = ml_collections.ConfigDict(dict(depth=2, num_latents=8, num_heads=4, head_dim=16, mlp_dim=256,
                                                 activation="squared_relu"))
    m.xattn = ml_collections.ConfigDict(dict(num_heads=4, head_dim=16, mlp_dim=256, activation="squared_relu"))
    m.xattn_every = 1                  # Flamingo-3B: before every LM layer
    # vocab_size / max_positions: 0 = the tokenizer's / what the longest source needs
    m.lm = ml_collections.ConfigDict(dict(width=96, num_layers=4, num_heads=4, mlp_dim=384, vocab_size=0,
                                          max_positions=0))
    m.freeze_vision = True
    m.freeze_lm = True

    # ---------------------------------------------------------------- optimisation
    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.end_lr_fraction = 0.05
    o.warmup_steps = 100
    o.weight_decay = 0.1
    o.grad_clip = 1.0
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.grad_accum_steps = 1
    o.groups = ml_collections.ConfigDict()

    c.init = ml_collections.ConfigDict()
    for name in ("vision", "lm"):
        c.init[name] = ml_collections.ConfigDict(dict(target=name, source="", path="", step=-1, source_target=""))

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 32                  # GLOBAL; the mixture's per-source batch sizes are what a step reads
    t.num_steps = 1500
    t.log_every = 50
    t.checkpoint_every = 500
    t.max_to_keep = 2
    t.dtype = "float32"
    t.param_dtype = "float32"
    t.peak_tflops = 0.0
    t.max_param_norm = 0.0
    t.max_update_norm = 0.0
    t.on_divergence = "stop"

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # ---------------------------------------------------------------- evaluation
    c.evals = ml_collections.ConfigDict()
    c.evals.fewshot = f = ml_collections.ConfigDict()
    f.every = 0
    f.split = "test"
    f.shots = (0, 4, 8, 16)
    f.trials = 3
    # random | rices | balanced (N-way K-shot: the demonstrations spread evenly over the episode's classes)
    f.selection = ("random", "rices", "balanced")
    f.num_episodes = 100               # queries per trial
    f.support_size = 24                # labelled images per episode (>= the largest shot count)
    f.use_cache = True
    f.batch_size = 8
    c.evals.caption = ec = ml_collections.ConfigDict()
    ec.every = 0
    ec.split = "test"
    ec.batch_size = 64
    ec.beam_size = 3
    ec.length_penalty = 0.0
    ec.max_len = 28
    ec.max_examples = 200
    ec.shots = 2                       # fixed caption demonstrations before the query image (Flamingo's few-shot captioning)
    ec.blind_baseline = True           # also evaluate 'caption_blind': the same model, no token sees the image
    ec.meteor = True                   # METEOR (a Java process, ~7 s a call on a 2-core CPU); tiny: off

    # Open-ended few-shot generation (vlm_jax/evaluation/fewshot_generation.py): k demonstrations from
    # the first support_size items of support_split, random or RICES, open_flamingo's 0-shot.
    # Learned positions cap the prompt: shots x (demonstration tokens) + max_len <= max_tokens + 8.
    for name, template, max_len in (("fewshot_caption", "Output:{}", 24), ("fewshot_vqa", "", 4)):
        c.evals[name] = ml_collections.ConfigDict(dict(
            enabled=True, every=0, split="test", support_split="train", template=template, shots=(0, 2, 4),
            trials=3, selection=("random", "rices"), num_queries=64, support_size=256, beam_size=3,
            max_len=max_len, batch_size=32))   # template '' (VQA) = data.qa_template
    c.evals.fewshot_caption.demo_caption = "shortest"   # 'first' (open_flamingo) | 'shortest': more shots fit
    c.evals.fewshot_caption.meteor = True       # METEOR in every caption scoring (shots x selections x trials)
    # the longest shortest synthetic caption is 21 words (24 tokens a demonstration): 3 shots + 24 new
    # tokens fit max_tokens + 8 = 104 positions, 4 may not
    c.evals.fewshot_caption.shots = (0, 1, 2, 3)

    if variant == "synthetic":
        mix.nonce.batch_size = 16          # 16 episodes x 8 images a step (the LM stage reads 32 text episodes)
        t.num_steps = 1200
    if variant == "lm_synthetic":
        m.stage = "lm"
        mix.qa.weight = 1.0                # question-answer text: the frozen LM knows the VQA prompt (README)
        # In-context copying is a seed-dependent phase transition (README): seed 1 copies the bound
        # nonce word 1.000 at step 3000; seed 0 plateaus at ~0.53 (a seen word, not the bound one)
        # through 4000 steps, with or without the QA text.
        c.seed = 1
        t.num_steps = 3000
        c.evals.fewshot.every = 0
    if variant == "tiny":
        d.image_size = 16
        d.num_train, d.num_val, d.num_test = 96, 48, 48
        d.max_caption_len = 12
        d.max_images, d.max_tokens, d.num_docs = 2, 40, 64
        d.nonce_way, d.nonce_words, d.nonce_shots = 2, 6, 3
        mix.pairs.batch_size = mix.docs.batch_size = mix.nonce.batch_size = mix.mmc4.batch_size = 8
        m.vision.update(dict(patch_size=8, width=20, num_layers=1, num_heads=2, mlp_dim=24))
        m.resampler.update(dict(depth=1, num_latents=3, num_heads=2, head_dim=6, mlp_dim=28))
        m.xattn.update(dict(num_heads=3, head_dim=5, mlp_dim=26))
        m.xattn_every = 2
        m.lm.update(dict(width=30, num_layers=2, num_heads=3, mlp_dim=44))
        o.warmup_steps = 2
        t.batch_size = 8
        t.num_steps = 4
        t.log_every = 2
        t.checkpoint_every = 2
        f.shots, f.trials, f.num_episodes, f.support_size, f.batch_size = (0, 2), 2, 8, 4, 8
        f.selection = ("random", "rices")
        ec.batch_size, ec.max_examples, ec.max_len, ec.beam_size, ec.shots = 8, 8, 8, 2, 1
        mix.qa.batch_size = 8
        for name in ("fewshot_caption", "fewshot_vqa"):
            c.evals[name].update(dict(shots=(0, 1), trials=2, num_queries=6, support_size=8, beam_size=2,
                                      max_len=4, batch_size=8))
        c.evals.fewshot_caption.trials = 1     # every caption scoring runs Java (PTB tokenizer, METEOR)
        ec.meteor = c.evals.fewshot_caption.meteor = False   # test_caption_eval checks METEOR
    if variant.startswith("paper_"):
        _paper_layout(c, variant)
    lm = overrides.pop("lm", "")
    if lm:
        for name in ("vision", "lm"):
            c.init[name].source, c.init[name].path = "checkpoint", lm
    config_lib.apply_overrides(c, overrides)
    c.lock()
    return c


def _paper_layout(c, variant: str) -> None:
    """The paper's Flamingo-3B / -9B shapes (see the module docstring for the deviations)."""
    d, m = c.data, c.model
    d.image_size = 320                                   # the paper's pretraining resolution
    # NFNet-F6 stand-in: width 1536 (the resampler's), 15 layers of MLP 4x: ~0.43B parameters
    m.vision.update(dict(patch_size=32, width=1536, num_layers=15, num_heads=16, mlp_dim=6144))
    # Perceiver Resampler (Table 4): 6 layers, 64 latents, 16 heads of 128, FFN 4x, Squared ReLU
    m.resampler.update(dict(depth=6, num_latents=64, num_heads=16, head_dim=128, mlp_dim=4 * 1536,
                            activation="squared_relu"))
    if variant == "paper_3b":
        lm = dict(width=2048, num_layers=24, num_heads=16, mlp_dim=4 * 2048)
        m.xattn_every = 1                                # a GATED XATTN-DENSE before every LM layer
        m.xattn.update(dict(num_heads=16, head_dim=128, mlp_dim=4 * 2048, activation="squared_relu"))
    else:
        lm = dict(width=4096, num_layers=32, num_heads=32, mlp_dim=4 * 4096)     # depth assumed (docstring)
        m.xattn_every = 4                                # every 4th LM layer
        m.xattn.update(dict(num_heads=32, head_dim=128, mlp_dim=4 * 4096, activation="squared_relu"))
    m.lm.update(dict(lm, vocab_size=32000, max_positions=2048))
