"""Show, Attend and Tell (Xu et al. 2015) configs.

Variants (`--config configs/sat.py:VARIANT[,key=value,...]`):
  tiny       seconds; what tests and smoke runs use.
  synthetic  the default main job: the embedded synthetic shapes dataset, trains on a 2-core CPU.
             Two named deviations from the paper are on (model.position_embedding='sincos' with
             model.position_dim=32, concatenated; model.attention_query='hidden+word'; README
             ablation); set them to 'none' / 'hidden' for the paper's model. With
             attention=hard, hard attention's deviations too (expectation warm-up, entropy decay,
             the expected-context baseline, the discounted reward-to-go; README hard table).
  coco       the paper's setup on COCO Karpathy splits: 14x14 annotation grid from a frozen
             ImageNet ResNet-101 read from a Hugging Face directory (config.init.encoder), 10k
             vocabulary, the paper's widths, lambda = 1, beam 5.

Variant-level shortcuts (inside the arg): `attention=hard`, `blind=1`.
Every other key is overridden on the command line as `--config.section.key=value`.

Commands:
  python train.py --config configs/sat.py:synthetic --workdir runs/sat_soft
  python train.py --config configs/sat.py:synthetic,attention=hard --workdir runs/sat_hard
  python train.py --config configs/sat.py:synthetic,blind=1 --workdir runs/sat_blind
  python eval.py  --config configs/sat.py:synthetic --workdir runs/sat_soft [--step N]
  python train.py --config configs/sat.py:coco --workdir runs/sat_coco \
      --config.data.manual_dir=/data/coco --config.init.encoder.path=/ckpt/resnet-101
      # manual_dir: dataset_coco.json + train2014/ val2014/; init.encoder.path: a Hugging Face
      # ResNetModel directory (e.g. microsoft/resnet-101 saved with save_pretrained)
  python train.py --config configs/sat.py:tiny --workdir /tmp/sat_tiny
"""
import ml_collections

from vlm_jax import config_lib

VARIANTS = ("tiny", "synthetic", "coco")


def get_config(arg=None):
    variant, overrides = config_lib.parse_arg(arg, VARIANTS, default="synthetic")
    c = ml_collections.ConfigDict()
    c.task = "sat"
    c.variant = variant
    c.seed = 0

    # ---------------------------------------------------------------- data
    c.data = d = config_lib.caption_data()

    # ---------------------------------------------------------------- model
    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 0                   # 0 = the tokenizer's size (the task builds it); > 0 fixes it
    m.encoder = "cnn"                  # 'cnn' | 'resnet50' | 'resnet101' | 'resnet' (shape from init.encoder)
    m.cnn_widths = (32, 64, 128)
    m.grid = 14                        # G: annotation grid is G x G (L = 196)
    m.annotation_dim = 128             # D
    m.embed_dim = 128                  # E
    m.hidden_dim = 256                 # n, LSTM units
    m.attention_dim = 128              # A
    m.dropout = 0.1
    m.attention = "soft"               # 'soft' | 'hard'
    # Doubly stochastic regularisation weight (paper: 1; `coco` uses 1). On the synthetic set
    # (L = 196 locations, ~15 words) it pushes attention to spread out and costs localization and
    # attribute precision (README ablation: lambda 1 / 0.1 / 0), so the synthetic default is 0.
    m.ds_lambda = 0.0
    m.gate = True                      # beta gate on the context
    # Deviations from the paper, on in `synthetic` and `tiny` (README ablation, issue 10); `coco`
    # keeps the paper's 'none' / 'hidden'. Without a position the annotations cannot say which
    # object is leftmost (listing order was at chance); a position table *added* to the CNN's
    # features trades binding for order (both share every dimension), a *concatenated* one
    # (position_dim > 0) does not. Without y_{t-1} the attention for a shape word does not know
    # which colour beam search just chose (colour bound to the wrong shape).
    m.position_embedding = "sincos"    # 'none' (paper) | 'learned' | 'sincos': the position table p
    m.position_dim = 32                # 0: p_i in R^D added, a_i + p_i; P > 0: p_i in R^P concatenated, [a_i; p_i]
    m.position_scale = 1.0             # 'sincos' only: p_i = scale * table (row norm scale * sqrt(width/2))
    m.attention_query = "hidden+word"  # 'hidden' (paper: f_att(a, h_{t-1})) | 'hidden+word' (+ W_y E y_{t-1})
    m.hard_entropy_weight = 0.01       # hard attention: lambda_e entropy bonus
    m.hard_baseline_decay = 0.9        # hard attention: moving-average baseline decay
    m.hard_baseline = "moving_average" # 'moving_average' (paper) | 'expectation': per caption, its
                                       # log-likelihood under the expected context (one more forward)
    m.hard_sample_fraction = 0.5       # prob. of using the expectation instead of a sample (paper: 0.5)
    # Hard-attention schedules (not in the paper; 0 = the paper's constants; README ablation):
    m.hard_expectation_warmup = 0      # updates over which that prob. falls from 1 to hard_sample_fraction
    m.hard_entropy_decay = 0           # updates over which lambda_e falls linearly to 0
    m.hard_samples = 1                 # hard attention: K sampled copies of every training caption, each
                                       # one's REINFORCE baseline the mean of the others (1 = the paper)
    m.hard_reward = "caption"          # 'caption' (paper: every step's sample scored with log p(y | s, a)) |
                                       # 'to_go': step t's with the words from t on (needs a per-caption baseline)
    m.hard_reward_discount = 1.0       # 'to_go': r_t = sum_{t'>=t} discount^(t'-t) log p(y_t'); 1 = unbiased
    m.hard_decode = "expectation"      # hard attention at test time: 'expectation' (paper) | 'argmax' cell
    m.freeze_encoder = False

    # ---------------------------------------------------------------- optimisation
    c.optim = o = ml_collections.ConfigDict()
    o.lr = 3e-3                        # peak (README: 2e-3 leaves seeds 1-2 under-trained at 1800 steps)
    o.end_lr_fraction = 0.05           # cosine decays to lr * end_lr_fraction
    o.warmup_steps = 100
    o.weight_decay = 1e-4
    o.grad_clip = 5.0
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.grad_accum_steps = 1             # microbatches per optimizer step (gradients averaged)
    # Parameter groups (vlm_jax/optim.py): name -> dict(pattern=regex over 'a/b/kernel' paths,
    # trainable, lr_mult, weight_decay, dtype). The task adds its defaults (freeze_encoder).
    o.groups = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- initialisation
    # Subtrees seeded from pretrained / earlier-run weights (vlm_jax/init_sources.py).
    c.init = ml_collections.ConfigDict()
    c.init.encoder = ml_collections.ConfigDict(dict(
        target="encoder", source="", path="", step=-1, source_target=""))

    # ---------------------------------------------------------------- training loop
    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 64                  # global batch (examples = image-caption pairs)
    t.num_steps = 1800
    t.log_every = 50
    t.checkpoint_every = 500
    t.max_to_keep = 2
    t.dtype = "float32"                # compute dtype; bfloat16 on accelerators
    t.param_dtype = "float32"
    t.peak_tflops = 0.0                # per-device peak for the logged MFU; 0 = measured ceiling of
                                       # a known GPU (H100 683, H200 652; vlm_jax/flops.py), none on CPU
    # Divergence guard (vlm_jax/train_lib.py DivergenceGuard): checked every step on device.
    t.max_param_norm = 0.0             # > 0: a step whose parameter norm exceeds this counts as diverged
    t.max_update_norm = 0.0            # > 0: the same for the norm of one update
    t.on_divergence = "stop"           # 'stop' (no checkpoint of a diverged state) | 'skip' (drop the step, count it)

    # ---------------------------------------------------------------- device mesh
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1 = all devices not used by fsdp x tensor
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # ---------------------------------------------------------------- evaluation
    # One section per evaluator (vlm_jax/evaluation/); each has its own period.
    c.evals = ml_collections.ConfigDict()
    c.evals.caption = e = ml_collections.ConfigDict()
    e.every = 0                        # steps between evaluations while training; 0 = only at the end
    e.split = "test"
    e.batch_size = 128                 # divisible by common device counts (data-parallel eval)
    e.beam_size = 3
    e.length_penalty = 0.0             # score = log p / length**length_penalty
    e.max_len = 26                     # generated words incl. eos
    e.num_figures = 6                  # attention figures (PNG) written per evaluation
    e.max_examples = 0                 # 0 = the whole split
    e.meteor = True                    # METEOR (a Java process, ~7 s a call on a 2-core CPU); tiny: off

    if variant == "tiny":
        d.image_size = 16
        d.num_train, d.num_val, d.num_test = 64, 16, 16
        d.max_caption_len = 12
        m.cnn_widths = (8, 16)
        m.grid = 4
        m.annotation_dim = m.embed_dim = m.attention_dim = 16
        m.hidden_dim = 32
        m.position_dim = 8
        m.dropout = 0.0
        m.ds_lambda = 1.0              # exercise the regulariser in the trainer tests
        o.warmup_steps = 2
        t.batch_size = 8
        t.num_steps = 4
        t.log_every = 2
        t.checkpoint_every = 2
        e.batch_size = 8
        e.beam_size = 2
        e.max_len = 8
        e.num_figures = 1
        e.meteor = False               # test_caption_eval checks METEOR; test_trainer's end-to-end run turns it on
    elif variant == "coco":
        d.name = "karpathy_captions"
        d.builder_config = "coco"
        d.num_train = d.num_val = d.num_test = 0   # 0 = whole Karpathy split
        d.image_size = 224
        d.max_caption_len = 20
        d.vocab_min_count = 5
        d.vocab_max_size = 10000
        d.mean = (0.485, 0.456, 0.406)
        d.std = (0.229, 0.224, 0.225)
        m.encoder = "resnet101"
        m.annotation_dim = 2048        # ResNet-101 final stage, 14 x 14 x 2048 (paper: VGG 14 x 14 x 512)
        m.embed_dim = 512
        m.hidden_dim = 1800            # paper's LSTM width
        m.attention_dim = 512
        m.dropout = 0.5
        m.ds_lambda = 1.0
        m.position_embedding = "none"
        m.position_dim = 0
        m.attention_query = "hidden"
        m.freeze_encoder = True
        c.init.encoder.source = "hf"   # + --config.init.encoder.path=/ckpt/resnet-101
        o.lr = 4e-4
        o.warmup_steps = 1000
        t.batch_size = 64
        t.num_steps = 100_000
        t.log_every = 100
        e.every = 10_000
        t.checkpoint_every = 2000
        t.max_to_keep = 3
        t.dtype = "bfloat16"
        e.split = "test"
        e.batch_size = 64
        e.beam_size = 5
        e.max_len = 22
        e.num_figures = 10

    if variant == "synthetic":
        # Hard attention's measured deviations (README, hard-attention table; read only with
        # model.attention='hard'). The paper's values, which `coco` and `tiny` keep: 0, 0,
        # 'moving_average', 'caption', 1.0.
        m.hard_expectation_warmup = 600
        m.hard_entropy_decay = 1800
        m.hard_baseline = "expectation"
        m.hard_reward = "to_go"
        m.hard_reward_discount = 0.5

    shortcuts = {"attention": "model.attention", "blind": "data.blind"}
    config_lib.apply_overrides(c, {shortcuts.get(k, k): v for k, v in overrides.items()})
    c.lock()
    return c
