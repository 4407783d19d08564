"""The task interface: how a model family (SAT, BLIP-2, Flamingo) plugs into the one trainer.

The trainer (`vlm_jax.train_lib`) and evaluator (`vlm_jax.eval_lib`) know nothing about a
particular model. They talk to a `Task`, created by `vlm_jax.tasks.make_task(config)` from
`config.task`. A task owns: how to build the model and initialise its variables, the loss,
which parameters train, and the evaluation hooks.

Variables are split in two collections that the trainer keeps in its state:
  params       -- differentiated and updated by the optimizer (where `param_labels` says 'train')
  model_state  -- everything else the model carries between steps and must checkpoint
                  (BatchNorm statistics, REINFORCE moving-average baselines, ...). Updated
                  by the loss function's return value, never by the optimizer.
"""
from __future__ import annotations

import abc
from typing import Any, Mapping

import jax

PyTree = Any
Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
    """Abstract model family. Subclasses live in `vlm_jax/tasks/<name>.py`."""

    name: str = "base"

    def __init__(self, config):
        self.config = config

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def example_batch(self, batch_size: int) -> dict[str, Any]:
        """A numpy batch with the training input shapes/dtypes (zeros are fine).

        Used for `init` and for building the abstract state and batch shardings.
        """

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

        `metrics` holds scalars to log (each loss term, accuracies, ...). Must include
        'num_tokens' when the task is token based so the trainer can report tokens/s.
        """

    def param_labels(self, params: PyTree) -> PyTree:
        """Pytree of 'train' / 'freeze' with the structure of (unboxed) params.

        Default: everything trains. Frozen towers return 'freeze' for their subtree.
        """
        return jax.tree.map(lambda _: "train", params)

    def logical_batch_axes(self) -> Mapping[str, tuple[str | None, ...]]:
        """Logical axis names of each batch entry (default: leading 'batch', rest None)."""
        return {}

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, params: PyTree, model_state: PyTree, *, workdir: str, step: int, mesh,
                 tokenizer=None, final: bool = False) -> dict[str, float]:
        """Run this family's evaluation (generation, metrics, plots) and write its files.

        Called by the trainer every `train.eval_every` steps and at the end, and by eval.py
        (`vlm_jax.eval_lib`). Writes under `<workdir>/eval/step_<step>/`. Returns flat scalar
        metrics to log. Default: no evaluation.
        """
        return {}
