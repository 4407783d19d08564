"""BLIP-2 (Li et al. 2023) configs. Stage 1: Q-Former pretraining (ITC + ITM + ITG); stage 2:
the Q-Former's query outputs as a soft prefix of an LM, trained on captions.

Variants (`--config configs/blip2.py:VARIANT[,key=value,...]`):
  tiny              seconds; what tests and smoke runs use (random tiny ViT, trained).
  stage1_synthetic  stage 1 on the embedded synthetic shapes set; trains on a 2-core CPU in
                    minutes. No pretrained image tower exists offline, so this variant trains a
                    small ViT together with the Q-Former (``model.freeze_vision=False``: a
                    named deviation from the paper, whose image encoder is frozen), and starts the
                    Q-Former from a width-scaled random init (``model.qformer.init_std=0``; the paper
                    starts from BERT-base, whose weights are not available offline; with BERT's
                    N(0, 0.02) at width 96 ITM did not learn within 1000 steps).
  stage1_paper      the paper's stage 1: EVA ViT-g/14 without its last block (a Hugging Face
                    Blip2VisionModel / CLIP directory in ``config.init.vision``), 224 px,
                    BERT-base Q-Former with 32 queries (``config.model.tokenizer_dir``: the
                    bert-base-uncased tokenizer; [DEC] is added), batch 1680, 250k steps, AdamW
                    b = (0.9, 0.98), weight decay 0.05, peak lr 1e-4, 2k warmup, cosine.
  stage2_opt_synthetic / stage2_t5_synthetic
                    stage 2 from a stage1_synthetic run (``stage1=<its workdir>``) with a small
                    OPT-shaped decoder / T5 encoder-decoder. No pretrained LM exists offline, so
                    these variants train the LM from scratch (``model.freeze_lm=False``: a named
                    deviation; the paper's LM is frozen).
  lm_opt_synthetic  stage 0 of the synthetic set (``model.stage='opt_text'``): the OPT-shaped
                    decoder alone, trained text-only on documents with a caption where the image
                    prefix will be (vlm_jax/data/context_text.py: another caption, or an answer
                    in the VQA prompt, after it; and both without context): the stand-in for the
                    web-pretrained LLM BLIP-2 keeps frozen. ``stage2_opt_synthetic,...,lm=<its
                    workdir>`` then keeps it frozen, as the paper does.
  lm_t5_synthetic   the same stage 0 for the T5 path (``model.stage='t5_text'``): a small T5
                    encoder-decoder trained on the same documents split as stage 2 splits its
                    input (context + <bos> + prompt in the encoder, the rest from the decoder);
                    ``stage2_t5_synthetic,...,lm=<its workdir>`` keeps it frozen.
  stage2_opt_paper / stage2_t5_paper
                    the paper's stage 2: from the stage-1 run, frozen OPT-2.7B / Flan-T5-XL read
                    from ``config.init.lm.path`` (+ ``model.lm_tokenizer_dir``), 80k steps, batch
                    1920 / 1520, the stage-1 optimiser settings.

Shortcut inside the arg: ``stage1=<workdir>`` sets config.init.{vision, ln_vision, qformer} to
that stage-1 run's final checkpoint (source='checkpoint') and builds the Q-Former with that run's
shape and the tower with its ``model.vision.posemb`` (its config.json); ``lm=<workdir>`` (stage 2, OPT) sets
config.init.lm to that stage-0 run, reads its LM shape (config.json) and vocabulary (vocab.json)
and freezes the LM (``model.freeze_lm=True``).

Every other key is overridden on the command line as `--config.section.key=value`.

Commands:
  python train.py --config configs/blip2.py:stage1_synthetic --workdir runs/blip2_stage1
  python eval.py  --config configs/blip2.py:stage1_synthetic --workdir runs/blip2_stage1
  python train.py --config configs/blip2.py:stage2_opt_synthetic,stage1=runs/blip2_stage1 --workdir runs/blip2_opt
  python train.py --config configs/blip2.py:stage2_t5_synthetic,stage1=runs/blip2_stage1 --workdir runs/blip2_t5
  python train.py --config configs/blip2.py:lm_opt_synthetic --workdir runs/blip2_lm
  python benchmarks/blip2_lm_probe.py --workdir runs/blip2_lm
  python train.py --config configs/blip2.py:stage2_opt_synthetic,stage1=runs/blip2_stage1,lm=runs/blip2_lm \
      --workdir runs/blip2_opt_frozen
  python train.py --config configs/blip2.py:lm_t5_synthetic --workdir runs/blip2_lm_t5
  python train.py --config configs/blip2.py:stage2_t5_synthetic,stage1=runs/blip2_stage1,lm=runs/blip2_lm_t5 \
      --workdir runs/blip2_t5_frozen
  python train.py --config configs/blip2.py:tiny --workdir /tmp/blip2_tiny
  python train.py --config configs/blip2.py:stage1_paper --workdir runs/blip2_paper \\
      --config.data.manual_dir=/data/coco --config.init.vision.path=/ckpt/blip2-vision-eva-g \\
      --config.model.tokenizer_dir=/ckpt/bert-base-uncased
"""
import ml_collections

from vlm_jax import config_lib

VARIANTS = ("tiny", "stage1_synthetic", "stage1_paper", "lm_opt_synthetic", "lm_t5_synthetic",
            "stage2_opt_synthetic", "stage2_t5_synthetic", "stage2_opt_paper", "stage2_t5_paper")
SYNTHETIC = ("tiny", "stage1_synthetic", "lm_opt_synthetic", "lm_t5_synthetic", "stage2_opt_synthetic",
             "stage2_t5_synthetic")
# The synthetic stage-0 LMs (lm_opt_synthetic / lm_t5_synthetic; stage 2 reads the shape back with
# lm=<workdir>). OPT: max_positions = the whole document; T5: the encoder's length (context +
# prompt), num_layers in each of encoder and decoder (2 + 2 layers ~ the OPT's 4 in parameters)
STAGE0_LM = dict(width=96, num_layers=4, num_heads=4, mlp_dim=384, max_positions=64)
# the Q-Former's shape, read back from a stage-1 run by stage1=<workdir>
QFORMER_SHAPE = ("num_queries", "width", "num_layers", "num_heads", "mlp_dim", "max_positions", "cross_attention_every")
STAGE0_T5 = dict(width=96, num_layers=2, num_heads=4, mlp_dim=256, max_positions=48)


def get_config(arg=None):
    variant, overrides = config_lib.parse_arg(arg, VARIANTS, default="stage1_synthetic")
    c = ml_collections.ConfigDict()
    c.task = "blip2"
    c.variant = variant
    c.seed = 0

    # ---------------------------------------------------------------- data (image-caption pairs)
    c.data = d = config_lib.caption_data()
    # stage 0 of the synthetic set (model.stage='opt_text', lm_opt_synthetic): text documents
    # (vlm_jax/data/context_text.py) and the sampling weight of each kind
    d.text = ml_collections.ConfigDict(dict(num_docs=100_000))
    # (qa_context 2 and 8000 steps: the caption-in-context answers of the README's probe, 0.617 vs 0.447 at 1 / 3000)
    d.text.mixture = ml_collections.ConfigDict(dict(describe=1.0, qa_context=2.0, caption=0.5, qa=0.5, restate=0.0))
    # qa_context documents: 'random' = any caption of the image as the context; 'stating' = one that states
    # the answer where only some do (position / relation; vlm_jax/data/synthetic.py:answer_evidence); the
    # lm_*_synthetic variants set 'stating'
    d.text.qa_context_caption = "random"
    # OPT stage 0: each document at a uniformly drawn start position in the LM's window (position ids
    # o..o+n-1, o ~ U{0..max_positions-n}), as web documents land anywhere in a pretraining window; False =
    # every document from position 0. Stage 2 puts the text after Q prefix vectors, at positions Q..: with Q = 32
    # an LM trained from 0 reads there far worse (README, BLIP-2, sixth session). OPT stage 0 only (T5: relative
    # positions).
    d.text.random_offset = False
    # stage 0: the probability that a document's location caption (context, describe target) is reworded
    # (clauses reordered, place first, ...: vlm_jax/data/synthetic.py:paraphrase_location); synthetic set only
    d.text.paraphrase = 0.0

    # ---------------------------------------------------------------- model
    c.model = m = ml_collections.ConfigDict()
    m.stage = "qformer"                # stage 1 (the stage-2 LM configs come with the stage-2 task)
    m.tokenizer_dir = ""               # '' = word vocabulary of the training captions; else a BERT tokenizer dir
    m.embed_dim = 256                  # E: ITC projection width
    m.feature_layer = -1               # image-tower hidden state fed to the Q-Former (-1 last raw, -2 penultimate)
    m.init_temperature = 0.07          # ITC tau, clamped to [0.001, 0.5]
    m.itc_label_smoothing = 0.1
    m.itg_label_smoothing = 0.1
    m.itm_negatives = "hard"           # 'hard' (the paper: from the ITC softmax) | 'random' (a diagnostic)
    m.objectives = "itc,itm,itg"       # stage-1 terms summed into the loss (a subset: the paper's ablation)
    m.freeze_vision = True             # the paper: frozen image encoder
    m.vision_dtype = "float32"         # compute dtype of the image tower ('bfloat16' / 'float16' on accelerators)
    m.vision_param_dtype = ""          # storage dtype of the frozen tower ('' = train.param_dtype)
    # Image tower built from config when config.init.vision is not 'hf' (the synthetic variants).
    # posemb: 'learned' (a pretrained tower's table) | 'sincos2d' (fixed 2-D code; the synthetic variants, whose ViT
    # trains from scratch: with a learned table its features carried no layout, README "Where the layout was lost")
    m.vision = ml_collections.ConfigDict(dict(patch_size=8, width=96, num_layers=3, num_heads=4, mlp_dim=192,
                                              preset="", posemb="learned"))   # preset: 'eva_vit_g14' | 'clip_vit_l14' | ...
    # Stage 2 (model.stage 'opt' | 't5'): the LM, built from model.lm when config.init.lm is not 'hf'.
    # max_positions: 0 = prefix + max_caption_len + 4 (what the captions need)
    m.lm = ml_collections.ConfigDict(dict(width=96, num_layers=2, num_heads=4, mlp_dim=192, max_positions=0))
    m.freeze_lm = True                 # the paper: frozen LM
    # T5 stage 2: 'random' = the paper's prefix-LM split (each caption cut at a uniformly drawn word: the
    # words before it join the prefix in the encoder, the rest is the decoder's target); 'none' = the
    # whole caption is the target (the encoder reads the prefix and <bos> only). OPT: 'none' only.
    # stage2_t5_paper: 'random'. The synthetic T5 keeps 'none': with the split its small frozen stage-0
    # LM answers VQA from the caption continuation (0.170 vs 0.420, README "BLIP-2", fifth session).
    m.prefix_lm_split = "none"
    # Stage 2: how query outputs become the LM's prefix. 'linear' (the paper: a Dense to the LM's embedding
    # width) | 'vocab_mixture' (a named deviation: a Dense to the LM's vocabulary, softmax, then the mean of the
    # frozen LM's word embeddings under it; each prefix vector a mixture of words; README, BLIP-2, sixth session)
    m.prefix_projection = "linear"
    m.lm_tokenizer_dir = ""            # the LM's tokenizer.json folder ('' = the word vocabulary)
    m.lm_dtype = "float32"             # LM compute dtype (bfloat16 / float16 on accelerators)
    m.lm_param_dtype = ""              # storage dtype of the frozen LM ('' = train.param_dtype)
    m.qformer = q = ml_collections.ConfigDict()
    q.num_queries = 32
    q.width = 768
    q.num_layers = 12
    q.num_heads = 12
    q.mlp_dim = 3072
    q.max_positions = 512
    q.cross_attention_every = 2
    q.dropout = 0.1
    q.scan_layers = False
    q.remat_policy = "none"
    # N(0, init_std) for the Q-Former's projection kernels when it starts from random (BERT: 0.02,
    # which the paper inherits from BERT-base weights); 0 = width-scaled, std 1/sqrt(fan_in).
    q.init_std = 0.02

    # ---------------------------------------------------------------- optimisation
    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-4
    o.end_lr_fraction = 0.0
    o.warmup_steps = 2000
    o.weight_decay = 0.05
    o.grad_clip = 0.0                  # LAVIS does not clip
    o.b1 = 0.9
    o.b2 = 0.98
    o.eps = 1e-8
    o.grad_accum_steps = 1
    o.groups = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- initialisation
    c.init = ml_collections.ConfigDict()
    for name in ("vision", "ln_vision", "qformer", "lm"):
        c.init[name] = ml_collections.ConfigDict(dict(target=name, source="", path="", step=-1, source_target=""))

    # ---------------------------------------------------------------- training loop
    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 1680
    t.num_steps = 250_000
    t.log_every = 100
    t.checkpoint_every = 5000
    t.max_to_keep = 3
    t.dtype = "float32"
    t.param_dtype = "float32"
    t.peak_tflops = 0.0
    # Divergence guard (vlm_jax/train_lib.py DivergenceGuard): checked every step on device.
    t.max_param_norm = 0.0             # > 0: a step whose parameter norm exceeds this counts as diverged
    t.max_update_norm = 0.0            # > 0: the same for the norm of one update
    t.on_divergence = "stop"           # 'stop' (no checkpoint of a diverged state) | 'skip' (drop the step, count it)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # ---------------------------------------------------------------- evaluation
    c.evals = ml_collections.ConfigDict()
    c.evals.retrieval = e = ml_collections.ConfigDict()
    e.every = 0
    e.split = "test"
    e.batch_size = 128
    e.k_test = 128                     # ITC shortlist re-ranked by ITM (paper/LAVIS: 128 COCO)
    e.rerank = True
    e.max_examples = 0
    e.num_figures = 4                  # text queries in retrieval_examples.png
    c.evals.caption = ec = ml_collections.ConfigDict()     # stage 2
    ec.every = 0
    ec.split = "test"
    ec.batch_size = 64
    ec.beam_size = 5                   # the paper: beam 5
    ec.length_penalty = 0.0
    ec.max_len = 30
    ec.max_examples = 0
    ec.meteor = True                   # METEOR (a Java process, ~7 s a call on a 2-core CPU); tiny: off
    c.evals.vqa = ev = ml_collections.ConfigDict()         # stage 2: zero-shot VQA (+ the question-only baseline)
    ev.enabled = True
    ev.every = 0
    ev.dataset = ""                    # '' = config.data's questions (the synthetic set's); 'vqav2' = local VQAv2 files
    ev.manual_dir = ""                 # vqav2: the folder of the official JSONs + train2014/ val2014/
    ev.split = "test"                  # vqav2: 'val' (its test splits have no public answers)
    ev.num_images = 0                  # vqav2: use only the first n images of the split (0 = all)
    ev.prompt = "Question: {} Short answer:"   # the paper's zero-shot VQA prompt
    ev.prompt_len = 32                 # prompt tokens (longer questions keep their end)
    ev.batch_size = 64
    ev.beam_size = 5                   # the paper: beam 5
    ev.length_penalty = 0.0
    ev.max_len = 10
    ev.max_questions = 0               # 0 = every question of the split
    ev.blind = True                    # also 'vqa_blind': the same LM answering without the image prefix

    if variant in SYNTHETIC:
        m.freeze_vision = False        # deviation: no pretrained image tower offline (see the docstring)
        m.vision.posemb = "sincos2d"   # the from-scratch ViT's layout (README, BLIP-2: where the layout was lost)
        m.embed_dim = 64
        q.num_queries = 8
        q.width, q.num_layers, q.num_heads, q.mlp_dim = 96, 2, 4, 192
        q.max_positions = 32
        q.dropout = 0.0
        q.init_std = 0.0               # deviation: width-scaled init (no BERT weights offline; README, BLIP-2)
        o.lr = 1e-3
        o.warmup_steps = 100
        o.end_lr_fraction = 0.05
        o.weight_decay = 0.05
        o.grad_clip = 1.0
        t.batch_size = 64
        t.num_steps = 1500
        t.log_every = 50
        t.checkpoint_every = 500
        t.max_to_keep = 2
        e.every = 500
        e.max_examples = 200
        e.batch_size = 64
        e.k_test = 16
    if variant == "tiny":
        d.image_size = 16
        d.num_train, d.num_val, d.num_test = 64, 16, 16
        d.max_caption_len = 12
        m.vision.update(dict(patch_size=4, width=16, num_layers=1, num_heads=2, mlp_dim=24))
        m.embed_dim = 8
        q.num_queries = 3
        q.width, q.num_layers, q.num_heads, q.mlp_dim = 24, 2, 2, 40
        q.max_positions = 16
        o.warmup_steps = 2
        t.batch_size = 8
        t.num_steps = 4
        t.log_every = 2
        t.checkpoint_every = 2
        e.every = 0
        e.max_examples = 0
        e.batch_size = 8
        e.k_test = 4
        e.num_figures = 1
        ev.max_questions, ev.batch_size, ev.beam_size, ev.max_len, ev.prompt_len = 8, 8, 2, 3, 12
        ec.meteor = False              # test_caption_eval checks METEOR
    elif variant == "stage1_paper":
        d.name = "karpathy_captions"
        d.builder_config = "coco"
        d.num_train = d.num_val = d.num_test = 0
        d.image_size = 224
        d.max_caption_len = 30
        d.mean = (0.48145466, 0.4578275, 0.40821073)     # CLIP / EVA normalisation
        d.std = (0.26862954, 0.26130258, 0.27577711)
        m.vision_dtype = "float16"
        m.vision_param_dtype = "float16"
        c.init.vision.source = "hf"     # + --config.init.vision.path=<Blip2VisionModel (EVA ViT-g, 39 blocks)>
        t.dtype = "float32"
        e.every = 10_000
        e.k_test = 128

    if variant.startswith("stage2_"):
        m.stage = "opt" if "_opt_" in variant else "t5"
        o.warmup_steps = min(o.warmup_steps, 100) if variant.endswith("synthetic") else 2000
        if variant.endswith("synthetic"):
            m.freeze_lm = False        # deviation: no pretrained LM offline (see the docstring)
            t.num_steps = 800
            e.every = 0
            ec.every = 0
            ec.max_examples = 200
            ec.beam_size = 3
            ec.max_len = 26
            ev.max_questions = 600
            ev.beam_size = 3
        else:
            m.vision.preset = "eva_vit_g14"
            m.vision_dtype = m.vision_param_dtype = "float16"
            m.lm_dtype = m.lm_param_dtype = "bfloat16"
            c.init.lm.source = "hf"    # + --config.init.lm.path=<opt-2.7b | flan-t5-xl>
            # COCO captions carry no questions: zero-shot VQA on local VQAv2 files is opt-in,
            # --config.evals.vqa.enabled=true --config.evals.vqa.dataset=vqav2 --config.evals.vqa.manual_dir=...
            ev.enabled, ev.split = False, "val"
            t.batch_size = 1920 if m.stage == "opt" else 1520
            t.num_steps = 80_000
            if m.stage == "t5":
                m.prefix_lm_split = "random"   # the paper's prefix-LM split (section 3.3)
            d.name, d.builder_config, d.image_size = "karpathy_captions", "coco", 224
            d.num_train = d.num_val = d.num_test = 0
            d.mean = (0.48145466, 0.4578275, 0.40821073)
            d.std = (0.26862954, 0.26130258, 0.27577711)
    if variant in ("lm_opt_synthetic", "lm_t5_synthetic"):
        # stage 0: the OPT-shaped decoder / T5 alone, text only (vlm_jax/data/context_text.py)
        m.stage = "opt_text" if variant == "lm_opt_synthetic" else "t5_text"
        # a reading corpus whose contexts state the answer (position / relation), so the stand-in LLM reads layout
        # from text as a web-pretrained one does (README, BLIP-2: stage 0 with answer-stating contexts)
        d.text.qa_context_caption = "stating"
        if m.stage == "opt_text":
            # the OPT stage 0 that carries position answers through stage 2 (README, BLIP-2, sixth session):
            # documents at random starts, location captions restated and reworded (the earlier rows:
            # --config.data.text.random_offset=false --config.data.text.paraphrase=0 --config.data.text.mixture.restate=0)
            d.text.random_offset, d.text.paraphrase, d.text.mixture.restate = True, 0.5, 1.0
        m.lm.update(STAGE0_LM if m.stage == "opt_text" else STAGE0_T5)
        o.lr, o.warmup_steps, o.end_lr_fraction, o.weight_decay, o.grad_clip = 1e-3, 100, 0.05, 0.05, 1.0
        t.batch_size = 64
        t.num_steps = 8000
        t.log_every = 100
        t.checkpoint_every = 1000
        t.max_to_keep = 1
    stage1 = overrides.pop("stage1", "")
    if stage1:
        for name in ("vision", "ln_vision", "qformer"):
            c.init[name].source, c.init[name].path = "checkpoint", stage1
        # the tower and the Q-Former are restored, so they are built as stage 1 built them: the Q-Former's shape and
        # the ViT's position code (runs from before that key: 'learned') come from the run's config.json
        what = f"configs/blip2.py stage1={stage1}"
        m.vision.posemb = config_lib.run_config_section(stage1, "model.vision", what=what).get("posemb", "learned")
        saved_q = config_lib.run_config_section(stage1, "model.qformer", what=what)
        for key in QFORMER_SHAPE:
            if key in saved_q:
                q[key] = type(q[key])(saved_q[key])
    lm = overrides.pop("lm", "")
    if lm:
        # stage 2 over a stage-0 LM (lm_opt_synthetic / lm_t5_synthetic), frozen as in the paper: its shape comes from
        # that run's config.json, its vocabulary from its vocab.json (vlm_jax/tasks/blip2.py)
        c.init.lm.source, c.init.lm.path = "checkpoint", lm
        m.lm.update(config_lib.run_config_section(lm, "model.lm", what=f"configs/blip2.py lm={lm}"))
        m.freeze_lm = True
    config_lib.apply_overrides(c, overrides)
    c.lock()
    return c
