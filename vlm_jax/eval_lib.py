"""The one evaluator driver: restore a workdir's checkpoint and run its task's evaluators.

    eval.py --config configs/<family>.py:VARIANT --workdir DIR [--step N]

The task reloads what training saved (e.g. SAT's vocabulary, never rebuilt), the checkpoint
(and the workdir's frozen parameters) is restored onto the current mesh, and every evaluator
of `Task.evaluators()` writes its files under `<workdir>/eval/step_<N>/`. Nothing else in the
workdir is written (config.json stays the training run's).
"""
from __future__ import annotations

import logging
import os

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import train_lib

log = logging.getLogger("vlm_jax")


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, dict[str, float]]:
    """-> {evaluator name: metrics} for checkpoint ``step`` (default: the latest readable)."""
    task, step, state = restore(config, workdir, step)
    log.info("evaluating step %d of %s", step, workdir)
    return train_lib.run_evaluators(task, state, workdir=workdir, step=step, final=True)


def restore(config, workdir: str, step: int | None = None):
    """-> (task, step, `TrainState`) of checkpoint ``step`` of ``workdir`` (default: the latest
    readable), without the data-iterator state; the errors name the workdir and the fix."""
    train_first = f"train first: python train.py --config ... --workdir {workdir}"
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ckpt_lib.CheckpointNotFoundError(
            f"--workdir {workdir!r} holds no checkpoints/; {train_first} (or pass the workdir of a training run).")
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.max_to_keep, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ckpt_lib.CheckpointNotFoundError(
                f"{ckpt.directory} holds no complete checkpoint step (a run that stopped before its first save); "
                f"{train_first}.")
        if step is not None and step not in steps:
            raise ckpt_lib.CheckpointNotFoundError(
                f"--step {step}: no checkpoint for that step in {ckpt.directory}; available steps: {steps}. Pass "
                "one of them, or leave out --step for the latest readable one.")
        flags = model_differences(config, workdir)
        if flags:
            log.warning("--config differs from the model %s/config.json trained (flags that restore it: %s)",
                        workdir, " ".join(flags))
        task, mesh = train_lib.make_task_and_mesh(config, workdir)
        program = train_lib.build_program(config, task, mesh)
        try:
            restored = train_lib.restore_state(program, ckpt, config, task, step=step, data_state=False,
                                               set_aside_unreadable=False)   # evaluation never moves files
        except ckpt_lib.CheckpointMismatchError as e:
            if not flags:
                raise
            raise ckpt_lib.CheckpointMismatchError(
                f"{e}\n--config builds a different model from the one {workdir} trained; add "
                f"{' '.join(flags)} (from its config.json).") from None
    finally:
        ckpt.close()
    if restored is None:
        raise ckpt_lib.CheckpointNotFoundError(f"no checkpoint in {workdir}/checkpoints; {train_first}.")
    step, state, _ = restored
    return task, step, state


def model_differences(config, workdir: str) -> list[str]:
    """`--config.model.K=V` flags for each `model` key whose value differs from the one in the
    run's saved config.json (empty when it is absent or unreadable, or nothing differs)."""
    import json
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            saved = json.load(f).get("model", {})
    except (OSError, ValueError, AttributeError):
        return []
    now = config.model.to_dict()
    flags = []
    for key in sorted(saved):
        if key not in now or isinstance(saved[key], dict):
            continue
        mine = list(now[key]) if isinstance(now[key], tuple) else now[key]
        if mine != saved[key]:
            value = ":".join(map(str, saved[key])) if isinstance(saved[key], list) else saved[key]
            flags.append(f"--config.model.{key}={value}")
    return flags
