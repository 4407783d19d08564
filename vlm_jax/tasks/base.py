"""The task interface: how a model family (SAT, BLIP-2, Flamingo) plugs into the one trainer.

The trainer (`vlm_jax.train_lib`) and the evaluator driver (`vlm_jax.eval_lib`) know nothing
about a particular model. They build a `Task` with `vlm_jax.tasks.make_task(config, workdir=...,
mesh=...)` from ``config.task`` and ask it for everything model-specific:

  prepare()            build files/dataset-dependent pieces before anything is traced
  tokenizer            the task's tokenizer(s), built or loaded by the task (SAT: a word
                       vocabulary from its training captions, saved in the workdir; BLIP-2: BERT
                       WordPiece + the LM's tokenizer from local directories; Flamingo: the LM
                       tokenizer with `<image>` / `<|endofchunk|>` added)
  train_iterator()     this process's training batches: numpy dicts (possibly nested, one
                       sub-dict per source for mixtures) whose leaves carry this process's rows of
                       the global batch, with get_state()/set_state() for exact resume
  batch_axes()         logical axis names of each batch leaf (default: dim 0 is the batch)
  example_batch(n)     zeros with the training batch's shapes (init, abstract state, FLOPs)
  init(rng, batch)     boxed variables {'params', 'model_state'}
  loss_fn(...)         pure, jittable loss
  param_groups()       default optimizer groups (`vlm_jax.optim.ParamGroup`: freezing, lr
                       multipliers, no-decay, storage dtype); config.optim.groups override them
  constrain_params(p)  projection applied to the trainable params after every update
                       (BLIP-2 clamps its ITC temperature to [0.001, 0.5])
  evaluators()         the task's `vlm_jax.evaluation.evaluator.Evaluator`s, each with its period
  checkpoint_meta()    metadata that must match when a checkpoint is restored (e.g. vocab size)

Variables are split in two collections that the trainer keeps in its state:
  params       -- parameters. The optimizer updates the trainable ones (by group); frozen ones
                  are held apart (no gradients, no optimizer slots, saved once per workdir).
  model_state  -- everything else the model carries between steps and must checkpoint
                  (BatchNorm statistics, REINFORCE moving-average baselines, ...). Updated by
                  the loss function's return value, never by the optimizer.
Pretrained or previous-stage values for named subtrees come from ``config.init``
(`vlm_jax.init_sources`), applied by the trainer after `init`.
"""
from __future__ import annotations

import abc
from typing import Any, Iterator, Mapping, Sequence

import jax

PyTree = Any
Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
    """Abstract model family. Subclasses live in `vlm_jax/tasks/<name>.py` (or any importable
    module named by ``config.task``) and expose ``make_task(config, *, workdir, mesh)``."""

    name: str = "base"

    def __init__(self, config, *, workdir: str | None = None, mesh=None):
        self.config = config
        self.workdir = workdir
        self.mesh = mesh

    def prepare(self) -> None:
        """Called once by the trainer right after construction, outside any trace and on every
        process: build what needs files or the dataset (tokenizer, dataset preparation with its
        cross-process barrier). Default: nothing."""

    # ------------------------------------------------------------------ data
    @property
    def tokenizer(self):
        """The task's tokenizer (None for a task without text)."""
        return None

    @abc.abstractmethod
    def train_iterator(self, *, process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[dict]:
        """Infinite iterator of this process's training batches (numpy), with get_state()/set_state()."""

    def batch_axes(self) -> Mapping[str, tuple]:
        """{batch key: logical axis names per dim}; keys left out are split over the batch axes
        on dim 0 (`vlm_jax.sharding.batch_shardings`). Nested batches nest this dict too."""
        return {}

    @abc.abstractmethod
    def example_batch(self, batch_size: int) -> dict[str, Any]:
        """A numpy batch with the training input shapes/dtypes (zeros are fine)."""

    # ------------------------------------------------------------------ model
    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        """-> {'params': ..., 'model_state': ...} (model_state may be {}).

        Params keep their `nn.Partitioned` boxes (logical axis names) so the trainer can
        derive shardings; the trainer unboxes them.
        """

    @abc.abstractmethod
    def loss_fn(self, params: PyTree, model_state: PyTree, batch: Batch, rng: jax.Array,
                *, train: bool) -> tuple[jax.Array, tuple[Metrics, PyTree]]:
        """Pure, jittable. -> (scalar loss, (metrics, new_model_state)).

        ``params`` is the full parameter tree (trainable and frozen). ``metrics`` holds scalars
        to log (each loss term, accuracies, ...); 'num_tokens' when the task is token based so
        the trainer can report tokens/s.
        """

    def param_groups(self) -> Sequence:
        """Default `vlm_jax.optim.ParamGroup`s (e.g. a frozen pretrained tower). Default: none."""
        return ()

    def constrain_params(self, params: PyTree) -> PyTree:
        """Called on the trainable params after each optimizer update (inside the jitted step)."""
        return params

    # ---------------------------------------------------------------- evaluation
    def evaluators(self) -> Sequence:
        """The task's evaluators (`vlm_jax.evaluation.evaluator.Evaluator`). Default: none."""
        return ()

    def checkpoint_meta(self) -> dict:
        """JSON-able values saved with every checkpoint that a restore must find equal."""
        return {}


class ImageCaptionTask(Task):
    """A task trained on the caption pipeline's (image, caption) pairs (SAT, BLIP-2 stage 1, the
    tests' two-tower task): batch = dict(image f32[B, S, S, 3], tokens i32[B, T], image_id i32[B]),
    S = ``data.image_size``, T = ``data.max_caption_len + 2`` (the tokenizer's template).
    Subclasses provide ``tokenizer``, the model and the loss."""

    def __init__(self, config, *, workdir: str | None = None, mesh=None):
        super().__init__(config, workdir=workdir, mesh=mesh)
        self.image_size = int(config.data.image_size)
        self.seq_len = int(config.data.max_caption_len) + 2

    def train_iterator(self, *, process_index: int | None = None, process_count: int | None = None):
        from vlm_jax.data import pipeline
        return pipeline.make_train_iterator(self.config, self.tokenizer, process_index=process_index,
                                            process_count=process_count)

    def example_batch(self, batch_size: int) -> dict[str, Any]:
        import numpy as np
        return {"image": np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32),
                "tokens": np.zeros((batch_size, self.seq_len), np.int32),
                "image_id": np.zeros((batch_size,), np.int32)}
