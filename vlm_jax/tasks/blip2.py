"""BLIP-2 as a trainer task. Stage 1 (``model.stage='qformer'``): Q-Former pretraining with ITC +
ITM + ITG against a frozen image encoder. Stage 2 (``model.stage='opt'`` | ``'t5'``,
`Blip2GenerationTask`): the stage-1 image encoder + Q-Former feed a soft prefix to a
decoder-only (OPT family) or encoder-decoder (Flan-T5 family) LM, trained on captions.

Dimension letters: B batch, S image side, T text length ([CLS] w1 .. wn [SEP] pad..), Q queries.

Pieces (each in its one place):
  model        `vlm_jax.models.blip2.Blip2QFormerModel` (Q-Former, heads, ln_vision)
  image tower  `VisionTransformer`: from a Hugging Face directory (``config.init.vision``,
               source='hf': CLIP / Blip2Vision / ViT; architecture from its config.json) or, with
               no pretrained tower, built from ``config.model.vision`` (the synthetic variants)
  loss         `vlm_jax.objectives.blip2.stage1_loss`
  tokenizer    ``model.tokenizer_dir`` set: that BERT WordPiece tokenizer with ``[DEC]`` added
               (as LAVIS); empty: the word vocabulary of the training captions (saved as
               ``<workdir>/vocab.json``), its <bos> playing [CLS] and one extra id for [DEC]
  freezing     ``vision/...`` frozen by default (``model.freeze_vision``); the ITC temperature
               clamped to [0.001, 0.5] after every update
  evaluators   ``evals.retrieval``: ITC shortlist + ITM re-ranking, R@1/5/10 both ways
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models.blip2 import TEMPERATURE_RANGE, Blip2Config, Blip2QFormerModel, QFormerConfig
from vlm_jax.objectives.blip2 import parse_objectives, stage1_loss
from vlm_jax.tasks.base import ImageCaptionTask, Task

VISION = "vision"
STAGES = ("qformer", "opt", "t5", "opt_text", "t5_text")   # *_text: the synthetic stage 0 (a text-only LM)
TEXT_STAGES = {"opt_text": "opt", "t5_text": "t5"}          # stage 0 -> the stage 2 that keeps its LM frozen
VISION_PRESETS = ("eva_vit_g14", "clip_vit_l14", "clip_vit_b16")


def _dtype(name: str, key: str):
    if name not in ("float32", "bfloat16", "float16"):
        from vlm_jax.config_lib import ConfigError
        raise ConfigError(f"config.{key}={name!r}: use 'float32', 'bfloat16' or 'float16'.")
    return jnp.dtype(name)


def vision_init_dir(config) -> str:
    """The HF directory of ``config.init.vision`` ('' when the image tower is built from config)."""
    if "vision" in config.init and config.init.vision.source == "hf":
        return config.init.vision.path
    return ""


def build_vision(config):
    """The image tower module (its weights come from ``config.init.vision`` when it is 'hf')."""
    dtype = _dtype(config.model.vision_dtype, "model.vision_dtype")
    hf_dir = vision_init_dir(config)
    if hf_dir:
        from vlm_jax.convert import conversion_for
        from vlm_jax.convert.common import read_hf_dir
        hf, tensors = read_hf_dir(hf_dir)
        return conversion_for(hf, tensors.keys(), dtype=dtype).module
    from vlm_jax.layers import vit as vit_lib
    from vlm_jax.layers.vit import ViTConfig, VisionTransformer
    v = config.model.vision
    if v.preset:       # a known tower whose weights come from a checkpoint (stage 2 after a stage-1 HF import)
        if v.preset not in VISION_PRESETS:
            from vlm_jax.config_lib import ConfigError
            raise ConfigError(f"config.model.vision.preset={v.preset!r}; use one of {VISION_PRESETS} or ''.")
        return VisionTransformer(getattr(vit_lib, v.preset)(image_size=int(config.data.image_size)), dtype=dtype)
    cfg = ViTConfig(image_size=int(config.data.image_size), patch_size=int(v.patch_size), hidden_size=int(v.width),
                    num_layers=int(v.num_layers), num_heads=int(v.num_heads), mlp_dim=int(v.mlp_dim),
                    norm_eps=1e-6, pool="none", posemb=str(v.posemb))
    return VisionTransformer(cfg, dtype=dtype)


def qformer_config(config, vocab_size: int) -> QFormerConfig:
    q = config.model.qformer
    return QFormerConfig(num_queries=int(q.num_queries), width=int(q.width), num_layers=int(q.num_layers),
                         num_heads=int(q.num_heads), mlp_dim=int(q.mlp_dim), vocab_size=int(vocab_size),
                         max_positions=int(q.max_positions), cross_attention_every=int(q.cross_attention_every),
                         dropout_rate=float(q.dropout), attention_dropout_rate=float(q.dropout),
                         scan_layers=bool(q.scan_layers), remat_policy=str(q.remat_policy))


class Blip2Task(ImageCaptionTask):
    """batch = dict(image f32[B, S, S, 3], tokens i32[B, T], image_id i32[B])."""

    name = "blip2"

    def __init__(self, config, *, workdir=None, mesh=None):
        super().__init__(config, workdir=workdir, mesh=mesh)
        self._tokenizer = None
        self._model = None
        self._evaluators = None

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tdir = self.config.model.tokenizer_dir
            if tdir:
                from vlm_jax.data.pretrained_tokenizer import PretrainedTokenizer
                self._tokenizer = PretrainedTokenizer.from_dir(tdir, added_tokens=("[DEC]",))
            else:
                from vlm_jax.data import pipeline
                self._tokenizer = pipeline.get_tokenizer(self.config, self.workdir)
        return self._tokenizer

    @property
    def dec_id(self) -> int:
        """The [DEC] id that starts an ITG sequence."""
        tok = self.tokenizer
        return tok.token_id("[DEC]") if self.config.model.tokenizer_dir else tok.vocab_size

    @property
    def vocab_size(self) -> int:
        """Q-Former vocabulary: the tokenizer's ids (+1 for [DEC] with the word vocabulary)."""
        tok = self.tokenizer
        return tok.vocab_size if self.config.model.tokenizer_dir else tok.vocab_size + 1

    @property
    def cls_id(self) -> int:
        tok = self.tokenizer
        prefix = tok.template[0]
        if len(prefix) != 1:
            from vlm_jax.config_lib import ConfigError
            raise ConfigError(f"the BLIP-2 text tokenizer must put one [CLS] token first; {tok!r} puts {prefix}.")
        return prefix[0]

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> Blip2QFormerModel:
        if self._model is None:
            m = self.config.model
            cfg = Blip2Config(qformer=qformer_config(self.config, self.vocab_size), embed_dim=int(m.embed_dim),
                              feature_layer=int(m.feature_layer), init_temperature=float(m.init_temperature))
            self._model = Blip2QFormerModel(vision=build_vision(self.config), config=cfg,
                                            dtype=_dtype(self.config.train.dtype, "train.dtype"))
        return self._model

    def prepare(self) -> None:
        _ = self.model, self.cls_id

    # ------------------------------------------------------------------ data
    def checkpoint_meta(self) -> dict:
        return {"vocab_size": int(self.vocab_size)}

    # ------------------------------------------------------------------ variables
    def init(self, rng, batch):
        """Random Q-Former and heads. With a pretrained image tower (``config.init.vision``) its
        subtree is a zeros placeholder of the right shapes (logical boxes kept) that the init
        source always overwrites, so the big tower's random init is never traced."""
        images, tokens = jnp.asarray(batch["image"]), jnp.asarray(batch["tokens"])
        tokens = tokens.at[:, 0].set(self.cls_id)
        valid = jnp.ones(tokens.shape, bool)
        std = float(self.config.model.qformer.get("init_std", 0.02))
        if not vision_init_dir(self.config):
            params = self.model.init({"params": rng}, images, tokens, valid)["params"]
            return {"params": rescale_qformer_init(params, std), "model_state": {}}
        from vlm_jax.init_sources import placeholder
        vis = self.model.vision
        vparams = placeholder(lambda r: vis.init(r, images)["params"], rng)
        feats = jax.eval_shape(lambda p: vis.apply({"params": p}, images, output_layer=self.model.config.feature_layer,
                                                   apply_final_norm=False).features, nn.unbox(vparams))

        def init_rest(module, feats, tokens, valid):
            f = module.ln_vision(feats)
            module.image_embeds(f)
            module.text_embeds(tokens, valid)
            module.itm_logits(f, tokens, valid)
            module.itg_pass(f, tokens, valid)
            return module.temp

        rest = nn.init(init_rest, self.model)({"params": rng}, jnp.zeros(feats.shape, jnp.float32), tokens,
                                              valid)["params"]
        return {"params": {**rescale_qformer_init(rest, std), VISION: vparams}, "model_state": {}}

    # ------------------------------------------------------------------ loss
    def loss_fn(self, params, model_state, batch, rng, *, train):
        m = self.config.model
        loss, metrics = stage1_loss(self.model, params, batch, rng, dec_id=self.dec_id,
                                    pad_id=int(self.tokenizer.pad_id), itc_smoothing=float(m.itc_label_smoothing),
                                    itg_smoothing=float(m.itg_label_smoothing), itm_negatives=m.itm_negatives,
                                    objectives=m.objectives, train=train)
        return loss, (metrics, model_state)

    def param_groups(self):
        """Default: the image tower is frozen (``model.freeze_vision``); a config group
        (``optim.groups``) of the same pattern overrides it."""
        from vlm_jax.optim import ParamGroup
        if not self.config.model.freeze_vision:
            return ()
        return (ParamGroup("frozen_vision", pattern=f"{VISION}/.*", trainable=False,
                           dtype=self.config.model.vision_param_dtype),)

    def constrain_params(self, params):
        if "temp" not in params:
            return params
        return dict(params, temp=jnp.clip(params["temp"], *TEMPERATURE_RANGE))

    # ------------------------------------------------------------------ evaluation
    def _apply(self, params, *args, method, **kw):
        return self.model.apply({"params": params}, *args, method=method, **kw)

    def embed_images(self, params, model_state, batch):
        feats = self._apply(params, batch["image"], method=Blip2QFormerModel.image_features)
        img, _ = self._apply(params, feats, method=Blip2QFormerModel.image_embeds)
        return {"img": img, "feats": feats}

    def embed_texts(self, params, model_state, batch):
        tokens = batch["tokens"]
        return {"txt": self._apply(params, tokens, tokens != self.tokenizer.pad_id,
                                   method=Blip2QFormerModel.text_embeds)}

    def match(self, params, model_state, batch):
        """ITM "match" logit (mean over queries of logit 1, as LAVIS re-ranks) ``[b]``."""
        tokens = batch["tokens"]
        logits = self._apply(params, batch["feats"], tokens, tokens != self.tokenizer.pad_id,
                             method=Blip2QFormerModel.itm_logits)
        return {"score": logits[:, 1]}

    def evaluators(self):
        if self._evaluators is None:
            from vlm_jax.evaluation.retrieval import RetrievalEvaluator
            e = self.config.evals.retrieval
            tok = self.tokenizer

            def load_split():
                from vlm_jax.data import pipeline
                return pipeline.load_eval_split(self.config, tok, e.split)

            self._evaluators = [RetrievalEvaluator(
                name="retrieval", every=int(e.every), embed_images=self.embed_images, embed_texts=self.embed_texts,
                match=self.match if e.rerank else None, load_split=load_split, tokenizer=tok,
                token_len=self.seq_len, batch_size=int(e.batch_size), k_test=int(e.k_test),
                max_examples=int(e.max_examples), mesh=self.mesh, num_figure_queries=int(e.num_figures))]
        return self._evaluators


_DEFAULT_STD = 0.02      # vlm_jax.layers.mlp.DEFAULT_KERNEL_INIT, BERT's initializer range
_HEAD_INPUT = ("query", "key", "value")     # kernels [D, H, K]: fan-in D; every other kernel: prod(shape[:-1])


def rescale_qformer_init(params, std: float):
    """The Q-Former's projection kernels (``qformer/.../kernel``, drawn from N(0, 0.02)) rescaled
    to N(0, std); ``std`` 0 = width-scaled, 1/sqrt(fan_in) per kernel. Embeddings, norms, biases,
    the query tokens and the ITC/ITM heads keep their init. A from-scratch Q-Former at small width
    mixes its query and text streams only weakly with BERT's 0.02 (std x sqrt(width) = 0.2 at
    width 96, against 0.55 at BERT-base's 768), which starves ITM (README, BLIP-2)."""
    if std == _DEFAULT_STD:
        return params
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def scale(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        if "qformer" not in names or names[-1] != "kernel":
            return x
        v = nn.unbox(x)
        fan_in = v.shape[0] if names[-2] in _HEAD_INPUT else int(np.prod(v.shape[:-1]))
        target = std if std > 0 else 1.0 / np.sqrt(fan_in)
        v = v * jnp.asarray(target / _DEFAULT_STD, v.dtype)
        return x.replace_boxed(v) if boxed(x) else v

    return jax.tree_util.tree_map_with_path(scale, params, is_leaf=boxed)


def validate(config) -> None:
    """BLIP-2-specific config checks (run by the trainer before anything compiles)."""
    from vlm_jax.config_lib import ConfigError, check_choice, check_positive, validate_data_section
    check_choice(config, "model.stage", STAGES)
    check_choice(config, "model.itm_negatives", ("hard", "random"))
    from vlm_jax.objectives.blip2 import PREFIX_LM_SPLITS
    check_choice(config, "model.prefix_lm_split", PREFIX_LM_SPLITS)
    from vlm_jax.models.blip2 import PREFIXES
    check_choice(config, "model.prefix_projection", PREFIXES)
    if config.data.get("text") is not None and config.data.text.get("random_offset", False) \
            and config.model.stage != "opt_text":
        raise ConfigError("config.data.text.random_offset=True places the OPT stage 0's documents in its position "
                          f"window (model.stage='opt_text'); model.stage={config.model.stage!r} does not read it "
                          "(T5's relative position biases do not depend on where a document starts). Set "
                          "--config.data.text.random_offset=false.")
    text = config.data.get("text")
    reword = text is not None and (float(text.get("paraphrase", 0.0)) > 0
                                   or float(text.get("mixture", {}).get("restate", 0.0)) > 0)
    if reword and config.model.stage in TEXT_STAGES and config.data.name != "synthetic_shapes":
        raise ConfigError(f"config.data.text.paraphrase / mixture.restate reword the synthetic set's location captions "
                          f"(vlm_jax/data/synthetic.py:paraphrase_location); data.name={config.data.name!r} has no "
                          "such grammar. Set --config.data.text.paraphrase=0 --config.data.text.mixture.restate=0.")
    if text is not None and not 0.0 <= float(text.get("paraphrase", 0.0)) <= 1.0:
        raise ConfigError(f"config.data.text.paraphrase={text.paraphrase} is a probability: use a value in [0, 1].")
    if config.model.prefix_lm_split != "none" and config.model.stage != "t5":
        raise ConfigError(f"config.model.prefix_lm_split={config.model.prefix_lm_split!r} is the encoder-decoder "
                          f"(T5) stage 2's split; model.stage={config.model.stage!r} trains with the plain LM loss "
                          "(the paper). Set --config.model.prefix_lm_split=none.")
    try:
        parse_objectives(config.model.objectives)
    except ValueError as e:
        raise ConfigError(f"config.model.{e}") from None
    check_positive(config, "model.embed_dim", "model.qformer.num_queries", "model.qformer.width",
                   "model.qformer.num_layers", "model.qformer.num_heads", "model.qformer.mlp_dim",
                   "model.qformer.cross_attention_every", "evals.retrieval.k_test", "data.image_size",
                   "data.max_caption_len")
    if float(config.model.qformer.get("init_std", 0.02)) < 0:
        raise ConfigError(f"config.model.qformer.init_std={config.model.qformer.init_std}: use a std > 0, or 0 for "
                          "the width-scaled 1/sqrt(fan_in).")
    for key in ("model.itc_label_smoothing", "model.itg_label_smoothing", "model.qformer.dropout"):
        v = float(_get(config, key))
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config.{key}={v!r} must lie in [0, 1).")
    lo, hi = TEMPERATURE_RANGE
    if not lo <= float(config.model.init_temperature) <= hi:
        raise ConfigError(f"config.model.init_temperature={config.model.init_temperature} must lie in the clamp "
                          f"range [{lo}, {hi}].")
    from vlm_jax.layers.vit import POSEMBS
    check_choice(config, "model.vision.posemb", POSEMBS)
    if config.model.vision.posemb == "sincos2d" and int(config.model.vision.width) % 4:
        raise ConfigError(f"config.model.vision.posemb='sincos2d' needs model.vision.width divisible by 4; got "
                          f"{config.model.vision.width}. Use a width like {int(config.model.vision.width) // 4 * 4 + 4} "
                          "or posemb='learned'.")
    q = config.model.qformer
    if q.width % q.num_heads:
        raise ConfigError(f"config.model.qformer.width={q.width} is not divisible by num_heads={q.num_heads}.")
    if config.data.max_caption_len + 2 > q.max_positions:
        raise ConfigError(f"config.data.max_caption_len + 2 = {config.data.max_caption_len + 2} exceeds "
                          f"config.model.qformer.max_positions={q.max_positions}.")
    seeded = lambda name: name in config.init and config.init[name].source in ("hf", "checkpoint") and \
        bool(config.init[name].path)  # noqa: E731
    if config.model.stage in TEXT_STAGES:
        check_positive(config, "model.lm.width", "model.lm.num_layers", "model.lm.num_heads", "model.lm.mlp_dim",
                       "model.lm.max_positions", "data.text.num_docs")
        if int(config.model.lm.max_positions) < 4:
            raise ConfigError(f"config.model.lm.max_positions={config.model.lm.max_positions}: a stage-0 document "
                              "needs at least 4 tokens (context, <bos>, text, <eos>); use e.g. 64.")
        weights = {k: float(config.data.text.mixture[k]) for k in config.data.text.mixture}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ConfigError(f"config.data.text.mixture={weights}: weights must be >= 0 with at least one > 0.")
        check_choice(config, "data.text.qa_context_caption", ("random", "stating"))
        if config.data.text.qa_context_caption == "stating" and config.data.name != "synthetic_shapes":
            raise ConfigError(f"config.data.text.qa_context_caption='stating' needs a dataset whose grammar says which "
                              f"caption states an answer (synthetic_shapes); data.name={config.data.name!r}: use 'random'.")
    elif config.model.stage != "qformer":
        for name in ("vision", "ln_vision", "qformer"):
            if not seeded(name):
                raise ConfigError(f"BLIP-2 stage 2 (model.stage={config.model.stage!r}) starts from a stage-1 run, but "
                                  f"config.init.{name} seeds nothing: pass the stage-1 workdir with the config "
                                  "shortcut, e.g. --config configs/blip2.py:stage2_opt_synthetic,stage1=runs/blip2_stage1 "
                                  f"(or set config.init.{name}.source=checkpoint and .path).")
        if config.model.freeze_lm and not (lm_init_dir(config) or lm_checkpoint_dir(config)):
            raise ConfigError("config.model.freeze_lm=True but config.init.lm gives no pretrained LM (source='hf', path=a "
                              "Hugging Face OPT / T5 directory; or source='checkpoint', path=a stage-0 run of "
                              "configs/blip2.py:lm_opt_synthetic / lm_t5_synthetic), so the captioner would decode through a frozen random "
                              "LM; set --config.init.lm.path=..., or --config.model.freeze_lm=false (the synthetic "
                              "variants train their small LM).")
        if lm_checkpoint_dir(config):
            run = lm_checkpoint_dir(config)
            from vlm_jax.config_lib import run_config_section
            stage0 = run_config_section(run, "model", what=f"config.init.lm.path={run!r}").get("stage")
            if TEXT_STAGES.get(stage0) != config.model.stage:
                want = {v: k for k, v in TEXT_STAGES.items()}.get(config.model.stage)
                raise ConfigError(f"config.init.lm.path={run!r} is a run of model.stage={stage0!r}, but this stage 2 is "
                                  f"model.stage={config.model.stage!r}, which needs a stage-0 LM of model.stage={want!r} "
                                  "(configs/blip2.py:lm_opt_synthetic -> stage2_opt_synthetic, lm_t5_synthetic -> "
                                  "stage2_t5_synthetic).")
        check_positive(config, "evals.caption.beam_size", "evals.caption.max_len", "model.lm.width",
                       "model.lm.num_layers", "model.lm.num_heads", "model.lm.mlp_dim")
        if "vqa" in config.evals and config.evals.vqa.enabled:
            _validate_vqa(config)
    elif config.model.freeze_vision and not seeded("vision"):
        raise ConfigError("config.model.freeze_vision=True but nothing initialises the image tower, so the Q-Former "
                          "would read a frozen random network: set --config.init.vision.source=hf "
                          "--config.init.vision.path=/path/to/hf-vision (CLIP / Blip2Vision / ViT directory), "
                          "or --config.model.freeze_vision=false (the synthetic variants train the tiny ViT).")
    if config.model.tokenizer_dir and not os.path.isdir(config.model.tokenizer_dir):
        raise ConfigError(f"config.model.tokenizer_dir={config.model.tokenizer_dir!r} is not a directory; point it "
                          "at a folder with a BERT tokenizer.json (e.g. bert-base-uncased saved with save_pretrained).")
    validate_data_section(config)


def _validate_vqa(config) -> None:
    from vlm_jax.config_lib import ConfigError, check_choice, check_positive
    e = config.evals.vqa
    check_choice(config, "evals.vqa.dataset", ("", "vqav2"))
    check_positive(config, "evals.vqa.beam_size", "evals.vqa.max_len", "evals.vqa.batch_size")
    if "{}" not in e.prompt:
        raise ConfigError(f"config.evals.vqa.prompt={e.prompt!r} has no '{{}}' for the question (the paper's: "
                          "'Question: {} Short answer:').")
    if int(e.prompt_len) < 2:
        raise ConfigError(f"config.evals.vqa.prompt_len={e.prompt_len}: the prompt needs at least its first token "
                          "and one prompt token.")
    if e.dataset == "vqav2" and e.split not in ("train", "val"):
        raise ConfigError(f"config.evals.vqa.split={e.split!r}: VQAv2's test splits have no public answers; use "
                          "--config.evals.vqa.split=val.")


def _get(config, key):
    from vlm_jax.config_lib import get_path
    return get_path(config, key)


# ----------------------------------------------------------------------------- stage 2
LM = "lm"


def lm_init_dir(config) -> str:
    """The HF directory of ``config.init.lm`` ('' when the LM is built from ``config.model.lm``)."""
    if "lm" in config.init and config.init.lm.source == "hf":
        return config.init.lm.path
    return ""


def lm_checkpoint_dir(config) -> str:
    """The stage-0 workdir of ``config.init.lm`` (source='checkpoint'), else ''."""
    if "lm" in config.init and config.init.lm.source == "checkpoint":
        return config.init.lm.path
    return ""


def stage0_tokenizer(workdir: str):
    """The word vocabulary a stage-0 text LM was trained with (``<workdir>/vocab.json``)."""
    from vlm_jax.config_lib import ConfigError
    from vlm_jax.data.tokenizer import WordTokenizer
    p = os.path.join(workdir, "vocab.json")
    if not os.path.exists(p):
        raise ConfigError(f"config.init.lm.path={workdir!r} has no vocab.json: point it at the workdir of a stage-0 "
                          "run (configs/blip2.py:lm_opt_synthetic), whose vocabulary the frozen LM was trained with.")
    return WordTokenizer.load(p)


def lm_config(config, vocab_size: int, prefix_len: int):
    """The LM's config: from the HF directory of ``config.init.lm`` (OPT / T5 config.json), or
    built from ``config.model.lm`` (the synthetic variants) with ``vocab_size`` ids."""
    from vlm_jax.layers.decoder_lm import DecoderLMConfig
    from vlm_jax.layers.t5 import T5Config
    stage, hf_dir = config.model.stage, lm_init_dir(config)
    if hf_dir:
        import json
        from vlm_jax.convert import text as text_convert
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf = json.load(f)
        return (text_convert.opt_config_from_hf(hf) if stage == "opt" else text_convert.t5_config_from_hf(hf))
    m = config.model.lm
    if stage in ("opt", "opt_text"):        # OPT-shaped: learned positions (offset 2), ReLU, pre-LN, tied head
        return DecoderLMConfig(vocab_size=vocab_size, width=int(m.width), num_layers=int(m.num_layers),
                               num_heads=int(m.num_heads), mlp_dim=int(m.mlp_dim),
                               max_positions=int(m.get("max_positions", 0)) or prefix_len + int(config.data.max_caption_len) + 4,
                               position_offset=2,
                               activation="relu", norm_position="pre")
    return T5Config(vocab_size=vocab_size, width=int(m.width), num_heads=int(m.num_heads),
                    head_dim=int(m.width) // int(m.num_heads), mlp_dim=int(m.mlp_dim), num_layers=int(m.num_layers))


class Blip2GenerationTask(Blip2Task):
    """Stage 2: batch = dict(image f32[B, S, S, 3], tokens i32[B, T], image_id i32[B]).

    The caption's tokens are split into the prompt (its first token: the tokenizer's <bos> /
    OPT's ``</s>``; the paper pretrains stage 2 without a text prompt) and the text to learn (the
    rest, ending with <eos>); with ``model.prefix_lm_split='random'`` (T5) the prompt also takes the
    caption's first k words, k drawn per caption and step (`objectives.blip2.prefix_lm_split`, the
    paper's prefix-LM split); loss = token cross-entropy on the text only
    (`Blip2LMModel.text_logits` gives the target mask: never the prefix, the prompt or padding).

    Parameters: ``vision`` (frozen: it comes from stage 1), ``ln_vision``, ``qformer`` (incl. the
    stage-1 text parameters, unused here, so a stage-1 checkpoint restores into it),
    ``language_projection``, ``lm`` (frozen with ``model.freeze_lm``). Stage-1 weights come from
    ``config.init.{vision, ln_vision, qformer}`` with ``source='checkpoint'`` (the shortcut
    ``stage1=<workdir>`` of configs/blip2.py fills all three).
    Evaluator ``evals.caption``: beam search with the shared generation, the project's caption
    metrics (BLEU, METEOR, ROUGE-L, CIDEr, grounded metrics on the synthetic set).
    """

    name = "blip2_generation"

    @property
    def dec_id(self) -> int:
        raise AttributeError("stage 2 has no [DEC] token (that is the stage-1 ITG decoder's).")

    @property
    def lm_vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def model(self):
        if self._model is None:
            from vlm_jax.models.blip2 import Blip2LMConfig, Blip2LMModel
            m = self.config.model
            # the stage-1 Q-Former layout (text params, LM head) so the stage-1 checkpoint fits it
            qcfg = qformer_config(self.config, self.stage1_vocab_size)
            cfg = Blip2LMConfig(lm=lm_config(self.config, self.lm_vocab_size, int(m.qformer.num_queries)), qformer=qcfg,
                                feature_layer=int(m.feature_layer), prefix=str(m.get("prefix_projection", "linear")))
            self._model = Blip2LMModel(vision=build_vision(self.config), config=cfg,
                                       dtype=_dtype(self.config.train.dtype, "train.dtype"),
                                       lm_dtype=_dtype(m.lm_dtype, "model.lm_dtype"))
        return self._model

    @property
    def stage1_vocab_size(self) -> int:
        """The stage-1 Q-Former's vocabulary: its BERT tokenizer + [DEC], or the word vocabulary + 1."""
        if self.config.model.tokenizer_dir:
            from vlm_jax.data.pretrained_tokenizer import PretrainedTokenizer
            return PretrainedTokenizer.from_dir(self.config.model.tokenizer_dir, added_tokens=("[DEC]",)).vocab_size
        if not lm_checkpoint_dir(self.config):
            return Blip2Task.vocab_size.fget(self)      # LM and Q-Former share the caption vocabulary
        from vlm_jax.data import pipeline
        q = self.config.init.qformer
        stage1 = q.path if q.source == "checkpoint" and q.path and os.path.exists(os.path.join(q.path, "vocab.json")) \
            else None
        return pipeline.get_tokenizer(self.config, stage1).vocab_size + 1

    @property
    def tokenizer(self):
        """The LM's tokenizer (``model.lm_tokenizer_dir``); an LM from a stage-0 run (init.lm
        source='checkpoint'): that run's vocabulary; else the word vocabulary of the captions."""
        if self._tokenizer is None:
            tdir, lm_run = self.config.model.lm_tokenizer_dir, lm_checkpoint_dir(self.config)
            if tdir:
                from vlm_jax.data.pretrained_tokenizer import PretrainedTokenizer
                self._tokenizer = PretrainedTokenizer.from_dir(tdir)
            elif lm_run:
                self._tokenizer = stage0_tokenizer(lm_run)
            else:
                from vlm_jax.data import pipeline
                self._tokenizer = pipeline.get_tokenizer(self.config, self.workdir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.lm_vocab_size

    def prepare(self) -> None:
        _ = self.model

    def checkpoint_meta(self) -> dict:
        return {"vocab_size": int(self.lm_vocab_size), "stage": self.config.model.stage}

    def init(self, rng, batch):
        images, tokens = jnp.asarray(batch["image"]), jnp.asarray(batch["tokens"])
        return {"params": self.model.init({"params": rng}, images, tokens)["params"], "model_state": {}}

    def loss_fn(self, params, model_state, batch, rng, *, train):
        from vlm_jax.models.blip2 import Blip2LMModel
        from vlm_jax.objectives.captioning import masked_cross_entropy
        from vlm_jax.objectives.blip2 import prefix_lm_split
        cut_rng = jax.random.fold_in(rng, 7) if train and self.config.model.prefix_lm_split == "random" else None
        prompt, pm, text, tm = prefix_lm_split(batch["tokens"], self.tokenizer.pad_id, cut_rng)
        logits, target_mask = self.model.apply({"params": params}, batch["image"], prompt, pm, text, tm,
                                               deterministic=not train, rngs={"dropout": rng} if train else {},
                                               method=Blip2LMModel.text_logits)
        x = masked_cross_entropy(logits, text, target_mask)
        metrics = {"loss": x.loss, "accuracy": x.accuracy, "num_tokens": x.num_tokens}
        return x.loss, (metrics, model_state)

    def param_groups(self):
        """The image tower is frozen (stage 1 trained or imported it); the LM with ``model.freeze_lm``."""
        from vlm_jax.optim import ParamGroup
        groups = [ParamGroup("frozen_vision", pattern=f"{VISION}/.*", trainable=False,
                             dtype=self.config.model.vision_param_dtype)]
        if self.config.model.freeze_lm:
            groups.append(ParamGroup("frozen_lm", pattern=f"{LM}/.*", trainable=False,
                                     dtype=self.config.model.lm_param_dtype))
        return tuple(groups)

    def constrain_params(self, params):
        return params

    def predict(self, params, model_state, batch, *, beam_size: int, max_len: int, length_penalty: float):
        """Beam-search captions of ``batch['image']`` -> {tokens i32[B, max_len], scores f32[B]}."""
        from vlm_jax.models.blip2 import generate
        tok = self.tokenizer
        b = batch["image"].shape[0]
        first = tok.template[0][0] if tok.template[0] else tok.bos_id
        prompt = jnp.full((b, 1), first, jnp.int32)
        res = generate(self.model, params, batch["image"], prompt, max_new_tokens=max_len, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, strategy="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
                       length_penalty=length_penalty)
        return {"tokens": res.tokens[:, 0], "scores": res.scores[:, 0]}

    def evaluators(self):
        if self._evaluators is None:
            import functools

            from vlm_jax.evaluation.caption_eval import CaptionEvaluator
            e = self.config.evals.caption
            tok = self.tokenizer

            def load_split():
                from vlm_jax.data import pipeline
                return pipeline.load_eval_split(self.config, tok, e.split)

            predict = functools.partial(self.predict, beam_size=int(e.beam_size), max_len=int(e.max_len),
                                        length_penalty=float(e.length_penalty))
            self._evaluators = [CaptionEvaluator(
                name="caption", every=int(e.every), predict=predict, input_keys=("image",), load_split=load_split,
                tokenizer=tok, batch_size=int(e.batch_size), max_examples=int(e.max_examples), num_figures=0,
                grid=1, mesh=self.mesh, meteor=bool(e.meteor))]
            if "vqa" in self.config.evals and self.config.evals.vqa.enabled:
                self._evaluators += self.vqa_evaluators()
        return self._evaluators


    # ------------------------------------------------------------------ zero-shot VQA
    def encode_question(self, question: str) -> dict[str, np.ndarray]:
        """``evals.vqa.prompt`` filled with the question -> {prompt i32[Tp], prompt_mask bool[Tp]}:
        the template's first token, then the prompt's ids (a long question keeps its end); LEFT
        padded for a decoder-only LM (its generation appends after the last real token), right
        padded for T5 (whose encoder reads [prefix; prompt] under the mask)."""
        e, tok = self.config.evals.vqa, self.tokenizer
        tp = int(e.prompt_len)
        first = tok.template[0][0] if tok.template[0] else tok.bos_id
        ids = [first] + list(tok.encode(e.prompt.format(question), add_special_tokens=False))[-(tp - 1):]
        prompt = np.full((tp,), tok.pad_id, np.int32)
        mask = np.zeros((tp,), bool)
        sl = slice(0, len(ids)) if self.model.config.seq2seq else slice(tp - len(ids), tp)
        prompt[sl], mask[sl] = ids, True
        return {"prompt": prompt, "prompt_mask": mask}

    def answer(self, params, model_state, batch, *, beam_size: int, max_len: int, length_penalty: float,
               use_image: bool = True):
        """Answers to ``batch['prompt']`` about ``batch['image']`` -> {tokens i32[B, max_len]}."""
        from vlm_jax.models.blip2 import generate
        tok = self.tokenizer
        res = generate(self.model, params, batch["image"], batch["prompt"], batch["prompt_mask"],
                       max_new_tokens=max_len, eos_id=tok.eos_id, pad_id=tok.pad_id, min_new_tokens=1,
                       strategy="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
                       length_penalty=length_penalty, use_image=use_image)
        return {"tokens": res.tokens[:, 0]}

    def vqa_evaluators(self) -> list:
        """'vqa' (zero-shot: the paper's prompt, beam search) and, with ``evals.vqa.blind``, 'vqa_blind'
        (the same LM and prompt without the image prefix: what the question alone gives)."""
        import functools

        from vlm_jax.evaluation.vqa import VQAEvaluator
        e = self.config.evals.vqa
        config = self.config
        if e.dataset:
            config = _with_data(self.config, name=e.dataset, manual_dir=e.manual_dir, builder_config="",
                                          **{f"num_{e.split}": int(e.num_images)})

        def load_split():
            from vlm_jax.data import pipeline
            return pipeline.load_eval_split(config, self.tokenizer, e.split)

        out = []
        for name, use_image in (("vqa", True), ("vqa_blind", False))[: 2 if e.blind else 1]:
            predict = functools.partial(self.answer, beam_size=int(e.beam_size), max_len=int(e.max_len),
                                        length_penalty=float(e.length_penalty), use_image=use_image)
            out.append(VQAEvaluator(name=name, every=int(e.every), predict=predict,
                                    input_keys=("image", "prompt", "prompt_mask"), encode=self.encode_question,
                                    load_split=load_split, tokenizer=self.tokenizer, batch_size=int(e.batch_size),
                                    max_questions=int(e.max_questions), mesh=self.mesh, prompt=e.prompt))
        return out


# ----------------------------------------------------------------------------- stage 0 (synthetic)
class Blip2TextLMTask(Task):
    """Stage 0 of the synthetic BLIP-2 (``model.stage='opt_text'`` or ``'t5_text'``): no pretrained
    LLM exists offline, so the OPT-shaped decoder / T5 encoder-decoder that stage 2 keeps frozen
    is first trained text-only on `vlm_jax.data.context_text` documents (a caption in the place
    of the image prefix, then another caption or an answer to one of the image's questions in
    the VQA prompt; and the same texts without context). Stage 2 reads it with ``lm=<this
    workdir>`` (configs/blip2.py).

    OPT: batch = dict(tokens i32[B, T], source_index i32[B]) (T = ``model.lm.max_positions``; the
    index of the document's kind in ``data.text.mixture``); loss = next-token cross-entropy on
    every real token. T5 (the prefix-LM split of stage 2: context + ``<bos>`` + prompt in the
    encoder, the rest generated): batch = dict(enc_tokens i32[B, Te], tokens i32[B, Td],
    source_index) (Te = ``model.lm.max_positions``, Td = ``data.max_caption_len`` + 2); loss =
    cross-entropy of the decoder's ``tokens`` (decoder input: the start id 0, then ``tokens``
    shifted right). Metrics per kind (``<kind>/loss``, ``<kind>/accuracy``).
    Parameters: ``lm/...`` (`DecoderLM` / `T5`), the subtree stage 2 restores. Tokenizer: the word
    vocabulary of the training captions, questions, answers and the VQA prompt, saved as
    ``vocab.json`` (stage 2 loads it from there).
    """

    name = "blip2_text_lm"

    def __init__(self, config, *, workdir=None, mesh=None):
        super().__init__(config, workdir=workdir, mesh=mesh)
        self._tokenizer = self._model = None
        self.seq_len = int(config.model.lm.max_positions)
        self.seq2seq = config.model.stage == "t5_text"
        self.target_len = int(config.data.max_caption_len) + 2 if self.seq2seq else 0
        self.kinds = tuple(k for k in config.data.text.mixture if float(config.data.text.mixture[k]) > 0)
        self.random_offset = bool(config.data.text.get("random_offset", False))

    @property
    def qa_template(self) -> str:
        return self.config.evals.vqa.prompt + " {}"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from vlm_jax.data.datasets import get_dataset
            from vlm_jax.data.tokenizer import WordTokenizer
            path = os.path.join(self.workdir, "vocab.json") if self.workdir else ""
            if path and os.path.exists(path):
                self._tokenizer = WordTokenizer.load(path)
            else:
                meta, d = get_dataset(self.config.data).meta("train"), self.config.data
                texts = [t for caps in meta.captions for t in caps]
                texts += [self.qa_template.format(q["question"], q["answer"]) for qs in meta.questions for q in qs]
                texts.append(self.qa_template.format("", ""))
                self._tokenizer = WordTokenizer.build(texts, min_count=d.vocab_min_count, max_size=d.vocab_max_size)
                if path and jax.process_index() == 0:
                    os.makedirs(self.workdir, exist_ok=True)
                    self._tokenizer.save(path)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            from vlm_jax.layers.decoder_lm import DecoderLM
            from vlm_jax.layers.t5 import T5
            cls = T5 if self.seq2seq else DecoderLM
            self._model = cls(lm_config(self.config, self.tokenizer.vocab_size, 0),
                              dtype=_dtype(self.config.train.dtype, "train.dtype"))
        return self._model

    def prepare(self) -> None:
        _ = self.model

    def checkpoint_meta(self) -> dict:
        return {"vocab_size": int(self.tokenizer.vocab_size), "stage": self.config.model.stage}

    def sources(self, split: str = "train") -> dict:
        from vlm_jax.data.context_text import ContextTextSource
        from vlm_jax.data.datasets import get_dataset
        meta = get_dataset(self.config.data).meta(split)
        evidence = None
        if self.config.data.text.get("qa_context_caption", "random") == "stating":
            from vlm_jax.data.synthetic import answer_evidence as evidence
        paraphrase, rewrite = float(self.config.data.text.get("paraphrase", 0.0)), None
        if paraphrase > 0 or "restate" in self.kinds:      # the synthetic grammar's rewording (validate)
            from vlm_jax.data.synthetic import paraphrase_location as rewrite
        return {k: ContextTextSource(k, meta.captions, meta.questions, tokenizer=self.tokenizer,
                                     template=self.qa_template, max_tokens=self.seq_len,
                                     num_docs=int(self.config.data.text.num_docs), seed=int(self.config.seed),
                                     evidence=evidence, layout="seq2seq" if self.seq2seq else "decoder",
                                     max_target_tokens=self.target_len, paraphrase=paraphrase, rewrite=rewrite)
                for k in self.kinds}

    def train_iterator(self, *, process_index=None, process_count=None):
        from vlm_jax.data.mixture import MixtureSource, make_mixture_iterator
        srcs = self.sources("train")
        mix = [MixtureSource(k, srcs[k], weight=float(self.config.data.text.mixture[k])) for k in self.kinds]
        return make_mixture_iterator(mix, global_batch_size=int(self.config.train.batch_size),
                                     seed=int(self.config.seed), process_index=process_index,
                                     process_count=process_count, worker_count=int(self.config.data.worker_count))

    def example_batch(self, batch_size: int):
        if self.seq2seq:
            return {"enc_tokens": np.zeros((batch_size, self.seq_len), np.int32),
                    "tokens": np.zeros((batch_size, self.target_len), np.int32),
                    "source_index": np.zeros((batch_size,), np.int32)}
        return {"tokens": np.zeros((batch_size, self.seq_len), np.int32),
                "source_index": np.zeros((batch_size,), np.int32)}

    def init(self, rng, batch):
        tokens = jnp.asarray(batch["tokens"])
        args = (jnp.asarray(batch["enc_tokens"]), tokens) if self.seq2seq else (tokens,)
        return {"params": {LM: self.model.init({"params": rng}, *args)["params"]}, "model_state": {}}

    def loss_fn(self, params, model_state, batch, rng, *, train):
        from vlm_jax.models.blip2 import Blip2LMConfig, shift_right
        from vlm_jax.objectives.captioning import masked_cross_entropy
        pad, tokens = self.tokenizer.pad_id, batch["tokens"]
        kw = dict(deterministic=not train, rngs={"dropout": rng} if train else {})
        if self.seq2seq:
            # as stage 2's T5 path (Blip2LMModel.text_logits): decoder [start; text[:-1]] predicts text
            enc, targets = batch["enc_tokens"], tokens
            valid = targets != pad
            dec_in, dec_mask = shift_right(tokens, valid, Blip2LMConfig.decoder_start_id)
            out = self.model.apply({"params": params[LM]}, enc, dec_in, attention_mask=enc != pad,
                                   decoder_mask=dec_mask, **kw)
        else:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            valid = targets != pad
            mask = inputs != pad
            position_ids = None
            if train and self.random_offset:
                rng, pos_rng = jax.random.split(rng)
                kw["rngs"] = {"dropout": rng}
                position_ids = random_start_positions(pos_rng, mask, self.seq_len)
            out = self.model.apply({"params": params[LM]}, inputs, attention_mask=mask, position_ids=position_ids,
                                   **kw)
        x = masked_cross_entropy(out.logits, targets, valid)
        metrics = {"loss": x.loss, "accuracy": x.accuracy, "num_tokens": x.num_tokens}
        for i, k in enumerate(self.kinds):       # per kind (source_index follows self.kinds)
            mk = valid & (batch["source_index"] == i)[:, None]
            xk = masked_cross_entropy(out.logits, targets, mk)
            metrics[f"{k}/loss"], metrics[f"{k}/accuracy"] = xk.loss, xk.accuracy
        return x.loss, (metrics, model_state)


def random_start_positions(rng, mask, max_positions: int):
    """Position ids ``[B, T]`` of right-padded documents (``mask`` bool ``[B, T]``, n_b real tokens
    each) that start at a uniformly drawn o_b in {0, ..., max_positions - n_b}: o_b .. o_b + n_b - 1 on
    the real tokens (pads: clipped to the last row; they are masked). ``data.text.random_offset``."""
    m = jnp.asarray(mask).astype(jnp.int32)
    n = m.sum(-1)                                                            # [B]
    hi = jnp.maximum(max_positions - n, 0)                                   # largest start
    o = jnp.floor(jax.random.uniform(rng, n.shape) * (hi + 1)).astype(jnp.int32)
    pos = o[:, None] + jnp.arange(m.shape[1], dtype=jnp.int32)[None]
    return jnp.minimum(pos, max_positions - 1)


def _with_data(config, **fields):
    """A copy of ``config`` whose ``data`` section has ``fields`` replaced (an evaluation set other
    than the training data, e.g. VQAv2 for a captioner)."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        for k, v in fields.items():
            c.data[k] = v
    return c


def make_task(config, *, workdir=None, mesh=None) -> Blip2Task:
    if config.model.stage == "qformer":
        return Blip2Task(config, workdir=workdir, mesh=mesh)
    if config.model.stage in TEXT_STAGES:
        return Blip2TextLMTask(config, workdir=workdir, mesh=mesh)
    return Blip2GenerationTask(config, workdir=workdir, mesh=mesh)
