"""Evaluators and the one predict-over-split helper they share.

An `Evaluator` is one evaluation with its own period: the trainer runs every evaluator whose
``every`` divides the step (``every > 0``) during training and all of them once at the end;
``eval.py`` runs all of them on a restored checkpoint. A task returns its evaluators from
`Task.evaluators()` (built from its ``config.evals.<name>`` sections); the loop never learns
what they compute.

`predict_over_split` runs a jittable ``predict(params, model_state, batch) -> {key: [B, ...]}``
over sharded batches of a split and hands every process all rows, each with its example id:

  batches   process-local dicts (this process's rows of each *global* batch, as
            `vlm_jax.data` eval splits yield them) holding ``id_key`` (int64 [b], -1 on
            padding) and ``valid`` (bool [b]) beside the model inputs;
  output    {example id: {key: numpy row}} over the valid rows, in split order, identical on
            every process (the jitted predictions are replicated), for any process count.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from vlm_jax import sharding

PyTree = Any


class Evaluator(abc.ABC):
    """One evaluation. Subclasses set ``name`` and ``every`` and implement `run`."""

    name: str = "eval"
    every: int = 0          # steps between runs during training; 0 = only at the end

    @abc.abstractmethod
    def run(self, params: PyTree, model_state: PyTree, *, step: int, workdir: str,
            final: bool) -> dict[str, float]:
        """Evaluate, write files under ``<workdir>/eval/step_<step>/`` and return flat scalars
        (logged under ``eval/<name>/...``). Called on every process (collective)."""


@dataclasses.dataclass
class PredictFn:
    """A jitted predict with replicated outputs, cached by the caller across evaluations."""
    fn: Callable
    mesh: Any
    input_keys: tuple[str, ...]

    def __call__(self, params, model_state, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        local = {k: batch[k] for k in self.input_keys}
        g = sharding.put_batch(local, self.mesh)
        with sharding.rules_context(self.mesh):
            return jax.device_get(self.fn(params, model_state, g))


def make_predict_fn(predict: Callable, mesh, input_keys: Iterable[str], *, id_key: str = "image_id") -> PredictFn:
    """``predict(params, model_state, batch) -> dict`` jitted so that its outputs, the ids and
    the validity flags come back replicated (every process sees every row)."""
    keys = tuple(dict.fromkeys(list(input_keys) + [id_key, "valid"]))

    def fn(params, model_state, batch):
        out = dict(predict(params, model_state, {k: v for k, v in batch.items() if k not in (id_key, "valid")}))
        out["__id"], out["__valid"] = batch[id_key], batch["valid"]
        return out

    return PredictFn(jax.jit(fn, out_shardings=sharding.replicated(mesh)), mesh, keys)


def predict_over_split(predict: PredictFn, params, model_state, batches: Iterable[Mapping[str, np.ndarray]], *,
                       limit: int | None = None) -> dict[int, dict[str, np.ndarray]]:
    """{example id: {output key: row}} for every valid row (see the module docstring).

    ``limit`` stops after that many examples (whole global batches)."""
    rows: dict[int, dict[str, np.ndarray]] = {}
    for batch in batches:
        out = predict(params, model_state, batch)
        valid = np.asarray(out.pop("__valid"))
        ids = np.asarray(out.pop("__id"))
        for r in np.nonzero(valid)[0]:
            rows[int(ids[r])] = {k: np.asarray(v[r]) for k, v in out.items()}
        if limit and len(rows) >= limit:
            break
    return rows


def eval_dir(workdir: str, step: int) -> str:
    import os
    out = os.path.join(workdir, "eval", f"step_{step}")
    os.makedirs(out, exist_ok=True)
    return out
