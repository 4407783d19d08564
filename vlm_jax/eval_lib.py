"""The one evaluator driver: restore a workdir's checkpoint and run its task's evaluation.

    eval.py --config configs/<family>.py:VARIANT --workdir DIR [--step N]

The tokenizer saved in the workdir by training is reloaded (never rebuilt), the checkpoint is
restored onto the current mesh, and `Task.evaluate` writes results/metrics/figures under
`<workdir>/eval/step_<N>/`.
"""
from __future__ import annotations

import logging
import os

import jax

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import train_lib

log = logging.getLogger("vlm_jax")


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"--workdir {workdir!r} holds no checkpoints/; train first with "
                                f"train.py --config ... --workdir {workdir}.")
    if not os.path.isfile(os.path.join(workdir, "vocab.json")):
        raise FileNotFoundError(f"--workdir {workdir!r} holds no vocab.json (written by train.py); "
                                "evaluate the workdir the model was trained in.")
    config, tokenizer, task, mesh = train_lib.prepare(config, workdir, save_config=False)
    s = train_lib.setup(config, task, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.max_to_keep, async_save=False)
    restored = ckpt.restore(s.abstract_state, step=step, data_state=False,
                            expect_meta={"task": config.task, "vocab_size": int(config.model.vocab_size)})
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first.")
    step, state, _, _ = restored
    log.info("evaluating step %d of %s", step, workdir)
    return task.evaluate(state.params, state.model_state, workdir=workdir, step=step, mesh=mesh,
                         tokenizer=tokenizer, final=True)
