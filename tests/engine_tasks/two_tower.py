"""A two-tower contrastive (CLIP-style) task defined outside the package, to prove the engine's
`Task` interface: it trains through the unchanged `vlm_jax.train_lib` loop and evaluates with
the shared `Evaluator` / `predict_over_split` mechanism.

Dimension letters: B global batch, S image side, T token length, D tower width, E joint
embedding width, N evaluation examples.

  image tower  a frozen Hugging Face ViTModel (``config.init.vision``, source='hf'), built from
               its config.json by `vlm_jax.convert.load_hf`; feature = final-normed [CLS] token;
               trainable linear projection ``image_proj`` [D_v, E].
  text tower   `BertEncoder` (random init, ``config.model.text``) over a WordPiece tokenizer read
               from ``config.model.tokenizer_dir`` (`PretrainedTokenizer.from_dir`); feature =
               [CLS] hidden state; trainable projection ``text_proj`` [D_t, E].
  loss         symmetric InfoNCE over the *global* batch with a learnable log-temperature
               ``log_temp`` (logits = exp(log_temp) * img @ txt.T, both L2-normalised); pairs that
               share an ``image_id`` (other than the diagonal) are removed from the softmax.
  constrain    ``log_temp`` clamped to [log(1/100), log(100)] after every update.
  evaluator    'retrieval' (``config.evals.retrieval``): embeds the eval split's images and first
               captions, reports strict text->image / image->text R@1 / R@5.

Parameter tree: {'vision', 'text', 'image_proj', 'text_proj', 'log_temp'}.
"""
from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import config_lib
from vlm_jax.evaluation.evaluator import Evaluator, eval_dir, make_predict_fn, predict_over_split
from vlm_jax.layers.bert import BertConfig, BertEncoder
from vlm_jax.layers.mlp import Dense
from vlm_jax.tasks.base import ImageCaptionTask

LOG_TEMP_MIN = math.log(1.0 / 100.0)
LOG_TEMP_MAX = math.log(100.0)
NEG = -1e9          # logit of a pair removed from the softmax (same image, not the diagonal)


# ----------------------------------------------------------------------------- config
def get_config(*, data_dir: str, vit_dir: str, tokenizer_dir: str, text_width: int = 16, text_heads: int = 2,
               text_mlp: int = 24, text_layers: int = 1, embed_dim: int = 8, num_steps: int = 4,
               eval_every: int = 2, text_lr_mult: float = 0.5, config_freezes_vision: bool = True,
               mesh_data: int = -1, mesh_fsdp: int = 1) -> ml_collections.ConfigDict:
    """The tiny two-tower config (unlocked: tests change fields). ``config_freezes_vision``:
    freeze the ViT with the config group ``optim.groups.vision`` (else the task's default group
    `TwoTowerTask.param_groups` freezes it)."""
    c = ml_collections.ConfigDict()
    c.task = "engine_tasks.two_tower"
    c.seed = 0

    # the synthetic dataset's fields, as configs/sat.py's tiny variant sets them
    c.data = config_lib.caption_data(data_dir=data_dir, image_size=16, num_train=64, num_val=16, num_test=16,
                                     max_caption_len=12)

    c.model = m = ml_collections.ConfigDict()
    m.tokenizer_dir = tokenizer_dir
    m.embed_dim = embed_dim
    m.init_temperature = 0.07          # log_temp starts at log(1 / 0.07)
    m.text = ml_collections.ConfigDict(dict(width=text_width, num_heads=text_heads, mlp_dim=text_mlp,
                                            num_layers=text_layers, max_positions=32))

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-2
    o.end_lr_fraction = 0.1
    o.warmup_steps = 1
    o.weight_decay = 1e-4
    o.grad_clip = 1.0
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.grad_accum_steps = 1
    o.groups = ml_collections.ConfigDict()
    if config_freezes_vision:
        o.groups.vision = ml_collections.ConfigDict(dict(pattern="vision/.*", trainable=False, lr_mult=1.0,
                                                         weight_decay=True, dtype=""))
    o.groups.text = ml_collections.ConfigDict(dict(pattern="text/.*", trainable=True, lr_mult=text_lr_mult,
                                                   weight_decay=True, dtype=""))

    c.init = ml_collections.ConfigDict()
    c.init.vision = ml_collections.ConfigDict(dict(target="vision", source="hf", path=vit_dir, step=-1,
                                                   source_target=""))

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 8
    t.num_steps = num_steps
    t.log_every = 1
    t.checkpoint_every = 2
    t.max_to_keep = 3
    t.dtype = "float32"
    t.param_dtype = "float32"
    t.peak_tflops = 0.0

    c.mesh = ml_collections.ConfigDict(dict(data=mesh_data, fsdp=mesh_fsdp, tensor=1))

    c.evals = ml_collections.ConfigDict()
    c.evals.retrieval = ml_collections.ConfigDict(dict(every=eval_every, split="test", batch_size=8,
                                                       max_examples=0))
    return c


def validate(config) -> None:
    """Task-specific checks (the trainer calls this before building anything)."""
    from vlm_jax.config_lib import ConfigError
    if "vision" not in config.init or config.init.vision.source != "hf" or not config.init.vision.path:
        raise ConfigError("engine_tasks.two_tower takes its image tower from a Hugging Face ViTModel: set "
                          "config.init.vision = dict(target='vision', source='hf', path=<dir>).")
    if not config.model.tokenizer_dir:
        raise ConfigError("config.model.tokenizer_dir is empty; give a directory with tokenizer.json.")


# ----------------------------------------------------------------------------- model
def l2_normalize(x, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
    """``image [B, S, S, 3]``, ``tokens [B, T]`` -> (img_emb [B, E], txt_emb [B, E]) L2-normalised."""
    vision: nn.Module                  # VisionTransformer built from the HF config (params 'vision/...')
    text_config: BertConfig
    embed_dim: int
    pad_id: int
    init_log_temp: float

    def setup(self):
        self.text = BertEncoder(self.text_config, name="text")
        self.image_proj = Dense(self.embed_dim, ("embed", None), name="image_proj")
        self.text_proj = Dense(self.embed_dim, ("embed", None), name="text_proj")
        self.log_temp = self.param("log_temp", lambda _: jnp.asarray(self.init_log_temp, jnp.float32))

    def embed_images(self, images):
        feats = self.vision(images).last_hidden_state[:, 0]        # final-normed [CLS]: [B, D_v]
        return l2_normalize(self.image_proj(feats))

    def embed_texts(self, tokens):
        out = self.text(tokens, attention_mask=(tokens != self.pad_id).astype(jnp.int32))
        return l2_normalize(self.text_proj(out.hidden[:, 0]))      # [CLS]: [B, D_t] -> [B, E]

    def __call__(self, images, tokens):
        return self.embed_images(images), self.embed_texts(tokens), self.log_temp


def contrastive_loss(img, txt, log_temp, image_ids):
    """Symmetric InfoNCE over the batch; rows sharing an image id are not negatives.
    -> (loss, i2t accuracy, t2i accuracy)."""
    logits = jnp.exp(log_temp) * jnp.einsum("ie,te->it", img, txt)          # [B (images), B (texts)]
    b = logits.shape[0]
    eye = jnp.eye(b, dtype=bool)
    same = image_ids[:, None] == image_ids[None, :]
    logits = jnp.where(same & ~eye, NEG, logits)
    labels = jnp.arange(b)
    i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    acc_i2t = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    acc_t2i = jnp.mean(jnp.argmax(logits, axis=0) == labels)
    return 0.5 * (i2t + t2i), i2t, t2i, acc_i2t, acc_t2i


# ----------------------------------------------------------------------------- task
class TwoTowerTask(ImageCaptionTask):
    """batch = dict(image f32[B, S, S, 3], tokens i32[B, T], image_id i32[B])."""

    name = "two_tower"

    def __init__(self, config, *, workdir=None, mesh=None):
        super().__init__(config, workdir=workdir, mesh=mesh)
        self._tokenizer = None
        self._model = None
        self._evaluators = None

    # ------------------------------------------------------------------ data
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from vlm_jax.data.pretrained_tokenizer import PretrainedTokenizer
            self._tokenizer = PretrainedTokenizer.from_dir(self.config.model.tokenizer_dir)
        return self._tokenizer

    def checkpoint_meta(self) -> dict:
        return {"vocab_size": int(self.tokenizer.vocab_size)}

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> TwoTower:
        if self._model is None:
            from vlm_jax.convert import load_hf
            vision = load_hf(self.config.init.vision.path)[0]       # the architecture of the HF config
            t = self.config.model.text
            text = BertConfig(vocab_size=int(self.tokenizer.vocab_size), width=int(t.width),
                              num_layers=int(t.num_layers), num_heads=int(t.num_heads), mlp_dim=int(t.mlp_dim),
                              max_positions=int(t.max_positions), pooler=False)
            self._model = TwoTower(vision=vision, text_config=text, embed_dim=int(self.config.model.embed_dim),
                                   pad_id=int(self.tokenizer.pad_id),
                                   init_log_temp=math.log(1.0 / float(self.config.model.init_temperature)))
        return self._model

    def init(self, rng, batch):
        """Random text tower and heads; the ViT subtree is zeros of the right shapes (with its
        logical axis boxes), a placeholder that ``config.init.vision`` always overwrites with the HF
        weights (`validate` insists on it), so its random init and forward pass are never traced."""
        images, tokens = jnp.asarray(batch["image"]), jnp.asarray(batch["tokens"])
        from vlm_jax.init_sources import placeholder
        vision = placeholder(lambda r: self.model.vision.init(r, images)["params"], rng)   # boxes kept

        def init_rest(module, images, tokens):
            module.embed_texts(tokens)
            module.image_proj(jnp.zeros((images.shape[0], module.vision.config.hidden_size), jnp.float32))
            return module.log_temp

        rest = nn.init(init_rest, self.model)({"params": rng}, images, tokens)["params"]
        return {"params": {**rest, "vision": vision}, "model_state": {}}

    def loss_fn(self, params, model_state, batch, rng, *, train):
        img, txt, log_temp = self.model.apply({"params": params}, batch["image"], batch["tokens"])
        loss, i2t, t2i, acc_i2t, acc_t2i = contrastive_loss(img, txt, log_temp, batch["image_id"])
        metrics = {"loss": loss, "loss_i2t": i2t, "loss_t2i": t2i, "accuracy_i2t": acc_i2t,
                   "accuracy_t2i": acc_t2i, "temperature": jnp.exp(-log_temp)}
        return loss, (metrics, model_state)

    def param_groups(self):
        """Task defaults: the ViT is frozen (a config group of the same pattern, e.g.
        ``optim.groups.vision``, takes precedence); the temperature is never decayed."""
        from vlm_jax.optim import ParamGroup
        return (ParamGroup("frozen_vision", pattern="vision/.*", trainable=False),
                ParamGroup("temperature", pattern="log_temp", weight_decay=False))

    def constrain_params(self, params):
        if "log_temp" not in params:
            return params
        return dict(params, log_temp=jnp.clip(params["log_temp"], LOG_TEMP_MIN, LOG_TEMP_MAX))

    # ------------------------------------------------------------------ evaluation
    def predict(self, params, model_state, batch):
        img, txt, _ = self.model.apply({"params": params}, batch["image"], batch["tokens"])
        return {"img": img, "txt": txt}

    def evaluators(self):
        if self._evaluators is None:
            self._evaluators = [RetrievalEvaluator(self, self.config.evals.retrieval)]
        return self._evaluators


def recall_at(sim: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    """sim [queries, candidates], the true candidate of query i is i. Strict rank: the number of
    *other* candidates scoring >= the true one (ties count against), so R@k = mean(rank < k)."""
    true = np.diagonal(sim)[:, None]
    others = ~np.eye(sim.shape[0], dtype=bool)
    rank = np.sum((sim >= true) & others, axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


class RetrievalEvaluator(Evaluator):
    """Text->image and image->text retrieval over the eval split (one caption per image: its first)."""

    name = "retrieval"

    def __init__(self, task: TwoTowerTask, cfg):
        self.task, self.cfg = task, cfg
        self.every = int(cfg.every)
        self.batch_size = int(cfg.batch_size)
        self._split = None
        self._predict = make_predict_fn(task.predict, task.mesh, ("image", "tokens"), id_key="image_id")

    def split(self):
        if self._split is None:
            from vlm_jax.data import pipeline
            self._split = pipeline.load_eval_split(self.task.config, self.task.tokenizer, self.cfg.split)
            self._split = self._split.subset(int(self.cfg.max_examples))
        return self._split

    def run(self, params, model_state, *, step, workdir, final):
        rows = predict_over_split(self._predict, params, model_state,
                                  self.split().batches(self.batch_size, with_tokens=True))
        ids = sorted(rows)
        img = np.stack([rows[i]["img"] for i in ids]).astype(np.float64)        # [N, E]
        txt = np.stack([rows[i]["txt"] for i in ids]).astype(np.float64)
        t2i = recall_at(txt @ img.T)
        i2t = recall_at(img @ txt.T)
        metrics = {"t2i_r1": t2i[1], "t2i_r5": t2i[5], "i2t_r1": i2t[1], "i2t_r5": i2t[5],
                   "num_examples": float(len(ids))}
        if jax.process_index() == 0:
            with open(os.path.join(eval_dir(workdir, step), "metrics.json"), "w") as f:
                json.dump({"step": int(step), "final": bool(final), **metrics}, f, indent=2)
        return metrics


def make_task(config, *, workdir=None, mesh=None) -> TwoTowerTask:
    return TwoTowerTask(config, workdir=workdir, mesh=mesh)
