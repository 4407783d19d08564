"""Show, Attend and Tell as a trainer task: model construction, loss, frozen encoder, beam-search predict.

Dimension letters: B batch, S image side, T caption length (<bos> .. <eos> <pad>..), V vocabulary,
L annotation locations.

Loss (Xu et al. 2015, eq. 13-14 for soft, eq. 12 for hard attention):
  soft: [sum_b -log p(y_b) + lambda * sum_b sum_i (1 - sum_t alpha_bti)^2] / #target tokens
  hard: the same + REINFORCE surrogate with a moving-average baseline - lambda_e * H[alpha]
        (optional schedules for the expectation mixing and lambda_e: `hard_attention_schedule`)
See `vlm_jax.objectives.captioning` for each term.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from vlm_jax.models.sat import SATModel
from vlm_jax.objectives import captioning
from vlm_jax.tasks.base import Batch, ImageCaptionTask, Metrics, PyTree

PAD_ID = 0                      # WordTokenizer.pad_id (docs/interfaces.md)
BASELINE_KEY = "reinforce_baseline"
UPDATES_KEY = "hard_updates"    # hard attention: loss evaluations so far (drives its schedules)
STATE_KEYS = (BASELINE_KEY, UPDATES_KEY)   # task state in model_state that is not a Flax collection
ENCODER_SUBTREE = "encoder"     # params['encoder'] is the image CNN; frozen with model.freeze_encoder
ENCODERS = ("cnn", "resnet", "resnet50", "resnet101")


def _dtype(name: str, key: str):
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config.{key}={name!r}: use 'float32' or 'bfloat16'.")
    return jnp.dtype(name)


def encoder_init_dir(config) -> str:
    """The HF ResNet directory of ``config.init.encoder`` ('' when the encoder starts random)."""
    if "init" in config and "encoder" in config.init and config.init.encoder.source == "hf":
        return config.init.encoder.path
    return ""


def build_encoder(config):
    """The SAT encoder module for ``model.encoder`` ('cnn' and 'resnet50'/'resnet101' are built from
    config; 'resnet' takes its architecture from the ``config.init.encoder`` HF checkpoint)."""
    m = config.model
    if m.encoder not in ENCODERS:
        from vlm_jax.config_lib import ConfigError
        raise ConfigError(f"config.model.encoder={m.encoder!r} is not supported; use one of {ENCODERS}.")
    kw = dict(dtype=_dtype(config.train.dtype, "train.dtype"),
              param_dtype=_dtype(config.train.param_dtype, "train.param_dtype"))
    if m.encoder == "cnn":
        from vlm_jax.layers.cnn import GridCNN
        return GridCNN(tuple(m.cnn_widths), int(m.grid), **kw)
    hf_dir = encoder_init_dir(config)
    if m.encoder == "resnet" or hf_dir:
        if not hf_dir:
            from vlm_jax.config_lib import ConfigError
            raise ConfigError("config.model.encoder='resnet' takes its architecture from a Hugging Face ResNetModel: "
                              "set --config.init.encoder.source=hf --config.init.encoder.path=/path/to/resnet.")
        from vlm_jax.convert.vision import resnet_module_from_hf
        module = resnet_module_from_hf(_read_json(os.path.join(hf_dir, "config.json"), "config.init.encoder.path"),
                                       grid=int(m.grid), **kw)
        if m.encoder != "resnet" and module.depth != int(m.encoder[len("resnet"):]):
            from vlm_jax.config_lib import ConfigError
            raise ConfigError(f"config.init.encoder.path={hf_dir!r} holds a ResNet-{module.depth} but "
                              f"config.model.encoder={m.encoder!r}; use the matching checkpoint, or encoder='resnet'.")
        return module
    from vlm_jax.layers.resnet import ResNet
    return ResNet(depth=int(m.encoder[len("resnet"):]), grid=int(m.grid), **kw)


def _read_json(path: str, key: str) -> dict:
    from vlm_jax.config_lib import ConfigError
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist; point at a Hugging Face model directory "
                          "(config.json + model.safetensors, as save_pretrained writes it).") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {path} is not valid JSON ({e}); re-download or re-save the checkpoint.") from None


def build_model(config, vocab_size: int) -> SATModel:
    """SATModel from config.model (+ config.train.dtype / param_dtype) for ``vocab_size`` words."""
    m = config.model
    return SATModel(
        vocab_size=int(vocab_size),
        encoder_kind="cnn" if m.encoder == "cnn" else "resnet",
        encoder=build_encoder(config),
        grid=int(m.grid),
        annotation_dim=int(m.annotation_dim),
        embed_dim=int(m.embed_dim),
        hidden_dim=int(m.hidden_dim),
        attention_dim=int(m.attention_dim),
        dropout=float(m.dropout),
        attention=m.attention,
        gate=bool(m.gate),
        position_embedding=m.position_embedding,
        position_scale=float(m.position_scale),
        position_dim=int(m.position_dim),
        attention_query=m.attention_query,
        hard_sample_fraction=float(m.hard_sample_fraction),
        hard_decode=str(m.hard_decode),
        freeze_encoder=bool(m.freeze_encoder),
        dtype=_dtype(config.train.dtype, "train.dtype"),
        param_dtype=_dtype(config.train.param_dtype, "train.param_dtype"),
    )


class SATTask(ImageCaptionTask):
    """Show, Attend and Tell: batch = dict(image f32[B, S, S, 3], tokens i32[B, T], image_id i32[B]).

    Tokenizer: a word vocabulary built from the training captions on first use and saved as
    ``<workdir>/vocab.json`` (reloaded afterwards, so evaluation decodes with the training
    vocabulary). ``model.vocab_size`` > 0 fixes the size without a dataset (benchmarks)."""

    name = "sat"

    def __init__(self, config, *, workdir=None, mesh=None):
        super().__init__(config, workdir=workdir, mesh=mesh)
        self.hard = config.model.attention == "hard"
        self._tokenizer = None
        self._model = None

    # ------------------------------------------------------------------ data
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from vlm_jax.data import pipeline
            if self.workdir and not os.path.isfile(os.path.join(self.workdir, "vocab.json")) and \
                    os.path.isdir(os.path.join(self.workdir, "checkpoints")) and \
                    any(n.isdigit() for n in os.listdir(os.path.join(self.workdir, "checkpoints"))):
                # a vocabulary rebuilt now could differ from the one the checkpoint was trained with
                raise FileNotFoundError(
                    f"--workdir {self.workdir!r} holds checkpoints but no vocab.json (written by train.py with "
                    "the first checkpoint); restore it from a copy of the run, or train in a fresh --workdir.")
            self._tokenizer = pipeline.get_tokenizer(self.config, self.workdir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        fixed = int(self.config.model.vocab_size)
        return fixed if fixed > 0 else self.tokenizer.vocab_size

    @property
    def model(self) -> SATModel:
        if self._model is None:
            self._model = build_model(self.config, self.vocab_size)
        return self._model

    def prepare(self) -> None:
        """Build the tokenizer (reads or builds the dataset; collective with several processes)
        and the model, before anything is traced."""
        _ = self.model

    def checkpoint_meta(self) -> dict:
        return {"vocab_size": int(self.vocab_size)}

    # ------------------------------------------------------------------ variables
    def _variables(self, params: PyTree, model_state: PyTree) -> dict[str, PyTree]:
        """Flax variables: params + every model-state entry that is a Flax collection (e.g. batch_stats)."""
        extra = {k: v for k, v in model_state.items() if k not in STATE_KEYS}
        return {"params": params, **extra}

    def init(self, rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        """-> {'params': boxed params, 'model_state': {Flax non-param collections..., 'reinforce_baseline': f32[] (hard)}}."""
        images = jnp.asarray(batch["image"])
        tokens = jnp.asarray(batch["tokens"])
        variables = dict(self.model.init({"params": rng}, images, tokens, train=False))
        params = variables.pop("params")
        model_state = dict(variables)
        if self.hard:
            model_state[BASELINE_KEY] = jnp.zeros((), jnp.float32)
            model_state[UPDATES_KEY] = jnp.zeros((), jnp.int32)
        return {"params": params, "model_state": model_state}

    # ------------------------------------------------------------------ loss
    def loss_fn(self, params: PyTree, model_state: PyTree, batch: Batch, rng: jax.Array,
                *, train: bool) -> tuple[jax.Array, tuple[Metrics, PyTree]]:
        """Pure and jittable. -> (loss, (metrics, new_model_state)).

        metrics: loss, xent, ds_reg, accuracy, num_tokens, entropy (mean H[alpha_t] over target
        tokens); hard attention also reinforce, baseline (after the update), the scheduled
        expectation_prob and entropy_weight of this update, and (training) advantage_abs, the
        mean |advantage| of the captions that sampled (how noisy the REINFORCE weights are; with
        ``hard_reward='to_go'`` each caption's mean |A_t| over its tokens, so it is not comparable
        with a 'caption' run's per-caption |A|).
        """
        mcfg = self.config.model
        images, tokens = batch["image"], batch["tokens"]
        samples = int(mcfg.get("hard_samples", 1))
        if self.hard and train and samples > 1:
            # multi-sample REINFORCE: K consecutive copies of every caption, each sampling its own
            # locations (`reinforce_hard_attention`'s leave-one-out baseline); the cross-entropy
            # is their mean, i.e. the same caption weight as with one sample
            images, tokens = jnp.repeat(images, samples, axis=0), jnp.repeat(tokens, samples, axis=0)
        targets = tokens[:, 1:]
        mask = targets != PAD_ID
        drop_rng, hard_rng = jax.random.split(rng)
        variables = self._variables(params, model_state)
        mutable = [k for k in ("batch_stats",) if k in variables] if train and not mcfg.freeze_encoder else []
        sched = None
        if self.hard:
            # counts loss evaluations (= optimizer updates; microbatches with grad accumulation)
            sched = captioning.hard_attention_schedule(
                model_state[UPDATES_KEY], expectation_prob=float(mcfg.hard_sample_fraction),
                expectation_warmup=int(mcfg.hard_expectation_warmup),
                entropy_weight=float(mcfg.hard_entropy_weight), entropy_decay=int(mcfg.hard_entropy_decay))
        with_reference = self.hard and train and mcfg.hard_baseline == "expectation"
        result = self.model.apply(variables, images, tokens, train=train,
                                  expectation_prob=None if sched is None else sched.expectation_prob,
                                  with_reference=with_reference, rngs={"dropout": drop_rng, "hard": hard_rng}, mutable=mutable or False)
        outputs, updates = result if mutable else (result, {})
        new_state = dict(model_state)
        new_state.update(updates)

        xent = captioning.masked_cross_entropy(outputs["logits"], targets, mask)
        ds_reg = captioning.doubly_stochastic_reg(outputs["alphas"], mask, float(mcfg.ds_lambda))
        loss = xent.loss + ds_reg
        entropy = captioning.attention_entropy(outputs["entropy"], mask)        # mean H[alpha_t] (both kinds)
        metrics = {"xent": xent.loss, "ds_reg": ds_reg, "accuracy": xent.accuracy, "num_tokens": xent.num_tokens,
                   "entropy": entropy}
        if self.hard:
            baseline = model_state[BASELINE_KEY]
            if train:
                if mcfg.get("hard_reward", "caption") == "to_go":
                    # per step: r_bt = sum_{t' >= t} gamma^(t'-t) log p(y_bt'), the words s_t can change
                    gamma = float(mcfg.get("hard_reward_discount", 1.0))
                    reward_of = lambda nll: captioning.reward_to_go(nll, gamma)    # [B, T]
                else:
                    reward_of = captioning.caption_log_likelihood                   # the paper: [B]
                reward = reward_of(xent.nll)
                reference = None
                if with_reference:
                    # r^_b = log p(y_b | expected context at every step): same annotations and dropout
                    # masks as the main pass (one encoder forward); no gradient
                    reference = jax.lax.stop_gradient(reward_of(
                        captioning.masked_cross_entropy(outputs["reference_logits"], targets, mask).nll))
                rf = captioning.reinforce_hard_attention(
                    reward, outputs["sample_logp"], mask, baseline,
                    decay=float(mcfg.hard_baseline_decay), normalizer=xent.num_tokens,
                    sampled=outputs["sampled"], reference=reference,
                    samples_per_caption=samples if train else 1,
                    caption_reward=captioning.caption_log_likelihood(xent.nll))   # b tracks log p(y | s, a)
                reinforce, baseline = rf.loss, rf.new_baseline
                new_state[BASELINE_KEY] = baseline
                new_state[UPDATES_KEY] = model_state[UPDATES_KEY] + 1
            else:
                reinforce = jnp.zeros((), jnp.float32)
            loss = loss + reinforce - sched.entropy_weight * entropy
            if train:
                n_sampled = jnp.maximum(jnp.sum(outputs["sampled"]), 1)
                adv = rf.advantage                                                  # [B] or [B, T]
                if adv.ndim == 2:   # per-step rewards: each caption's mean |A_t| over its tokens
                    m = mask.astype(jnp.float32)
                    adv = jnp.sum(jnp.abs(adv) * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
                metrics["advantage_abs"] = jnp.sum(jnp.abs(adv) * outputs["sampled"]) / n_sampled
            metrics.update(reinforce=reinforce, entropy=entropy, baseline=baseline,
                           expectation_prob=sched.expectation_prob, entropy_weight=sched.entropy_weight)
        metrics["loss"] = loss
        return loss, (metrics, new_state)

    # ------------------------------------------------------------------ freezing
    def param_groups(self):
        """The encoder is a frozen group with ``model.freeze_encoder`` (its BatchNorm also runs in
        inference mode and its output is stop-gradient'ed inside the model)."""
        from vlm_jax.optim import ParamGroup
        if not self.config.model.freeze_encoder:
            return ()
        return (ParamGroup("frozen_encoder", pattern=f"{ENCODER_SUBTREE}/.*", trainable=False),)

    # ------------------------------------------------------------------ generation
    def predict(self, params: PyTree, model_state: PyTree, images: jax.Array, *, beam_size: int,
                max_len: int, length_penalty: float, bos_id: int, eos_id: int) -> dict[str, jax.Array]:
        """Beam search for a batch of images (jittable; keyword args are static).

        images f32[B, S, S, 3] -> dict(tokens i32[B, max_len] (no <bos>; <eos> then pad 0),
        scores f32[B] (sum log p / length**length_penalty), alphas f32[B, max_len, L] (the
        attention that produced each generated word)) for the best beam.
        """
        from vlm_jax import decoding  # written beside this file; imported where used

        variables = self._variables(params, model_state)
        annotations = self.model.apply(variables, images, method=SATModel.encode)
        state = self.model.apply(variables, annotations, method=SATModel.init_decode_state)

        def step_fn(tokens, state, t):
            del t
            return self.model.apply(variables, tokens, state, method=SATModel.decode_step)

        res = decoding.beam_search(step_fn, state, bos_id=bos_id, eos_id=eos_id, max_len=max_len,
                                   beam_size=beam_size, length_penalty=length_penalty)
        return {"tokens": res.tokens[:, 0], "scores": res.scores[:, 0], "alphas": res.aux[:, 0]}


    # ------------------------------------------------------------------ evaluation
    def evaluators(self):
        """``config.evals.caption``: beam-search captions of the eval split -> caption metrics,
        attention figures and localization (`vlm_jax.evaluation.caption_eval`)."""
        if not hasattr(self, "_evaluators"):
            import functools

            from vlm_jax.evaluation.caption_eval import CaptionEvaluator

            e = self.config.evals.caption
            tok = self.tokenizer
            predict = functools.partial(self.predict, beam_size=int(e.beam_size), max_len=int(e.max_len),
                                        length_penalty=float(e.length_penalty), bos_id=tok.bos_id, eos_id=tok.eos_id)

            def load_split():
                from vlm_jax.data import pipeline
                return pipeline.load_eval_split(self.config, tok, e.split)

            self._evaluators = [CaptionEvaluator(
                name="caption", every=int(e.every),
                predict=lambda params, model_state, batch: predict(params, model_state, batch["image"]),
                input_keys=("image",), load_split=load_split, tokenizer=tok, batch_size=int(e.batch_size),
                max_examples=int(e.max_examples), num_figures=int(e.num_figures), grid=int(self.config.model.grid),
                mesh=self.mesh, meteor=bool(e.meteor))]
        return self._evaluators


def validate(config) -> None:
    """SAT-specific config checks (run by the trainer before anything compiles)."""
    from vlm_jax.config_lib import ConfigError, check_choice, check_positive, validate_data_section

    check_choice(config, "model.attention", ("soft", "hard"))
    check_choice(config, "model.hard_baseline", ("moving_average", "expectation"))
    if "hard_reward" in config.model:   # (run configs written before these keys existed lack them)
        check_choice(config, "model.hard_reward", ("caption", "to_go"))
        gamma = float(config.model.get("hard_reward_discount", 1.0))
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"config.model.hard_reward_discount={gamma!r} must lie in [0, 1] "
                              "(1 = the unbiased reward-to-go).")
        m = config.model
        every_copy_samples = (int(m.hard_samples) > 1 and float(m.hard_sample_fraction) == 0.0
                              and int(m.hard_expectation_warmup) == 0)
        if m.attention == "hard" and m.hard_reward == "to_go" and m.hard_baseline != "expectation" \
                and not every_copy_samples:
            raise ConfigError("model.hard_reward='to_go' scores each step with its own reward, which the scalar "
                              "moving-average baseline cannot centre; set --config.model.hard_baseline=expectation, "
                              "or --config.model.hard_samples=K (K > 1) with --config.model.hard_sample_fraction=0 "
                              "--config.model.hard_expectation_warmup=0 (every copy samples, so each has others to "
                              "compare with), or --config.model.hard_reward=caption (the paper's estimator).")
    check_choice(config, "model.hard_decode", ("expectation", "argmax"))
    check_positive(config, "model.position_dim", allow_zero=True)
    pdim = int(config.model.position_dim) or int(config.model.annotation_dim)
    if config.model.position_embedding == "sincos" and pdim % 4:
        raise ConfigError(f"config.model.position_dim={config.model.position_dim} (0 = annotation_dim="
                          f"{config.model.annotation_dim}): the 2-D sin-cos table needs a width divisible by 4 "
                          "(--config.model.position_dim=32, say).")
    check_choice(config, "model.position_embedding", ("none", "learned", "sincos"))
    check_choice(config, "model.attention_query", ("hidden", "hidden+word"))
    check_choice(config, "model.encoder", ENCODERS)
    check_positive(config, "model.position_scale", "model.grid", "model.annotation_dim", "model.embed_dim", "model.hidden_dim",
                   "model.attention_dim", "evals.caption.beam_size", "evals.caption.max_len",
                   "evals.caption.batch_size", "data.image_size", "data.max_caption_len")
    check_positive(config, "model.hard_samples")
    check_positive(config, "model.ds_lambda", "model.hard_entropy_weight", "evals.caption.length_penalty",
                   "evals.caption.every", "model.vocab_size", "model.hard_expectation_warmup",
                   "model.hard_entropy_decay", allow_zero=True)
    if config.model.freeze_encoder and config.model.encoder != "cnn" and not encoder_init_dir(config):
        raise ConfigError(f"config.model.freeze_encoder=True with a {config.model.encoder} encoder but nothing "
                          "initialises it, so the captioner would train on a frozen random network: set "
                          "--config.init.encoder.source=hf --config.init.encoder.path=/path/to/hf-resnet "
                          "(a Hugging Face ResNetModel directory), or --config.model.freeze_encoder=false.")
    for key in ("model.dropout", "model.hard_baseline_decay", "model.hard_sample_fraction"):
        value = config_value(config, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config.{key}={value!r} must lie in [0, 1] (--config.{key}=...).")
    if config.model.encoder == "cnn" and not config.model.cnn_widths:
        raise ConfigError("config.model.cnn_widths is empty; give the channel widths, e.g. 32:64:128.")
    validate_data_section(config)


def config_value(config, key: str):
    from vlm_jax.config_lib import get_path
    return get_path(config, key)


def make_task(config, *, workdir=None, mesh=None) -> SATTask:
    return SATTask(config, workdir=workdir, mesh=mesh)
