"""The one trainer, shared by every model family.

    train.py --config configs/<family>.py:VARIANT --workdir DIR [--config.key=value ...]

Flow: validate config -> tokenizer (built once, saved in the workdir) -> task (vlm_jax.tasks) ->
mesh -> abstract state + shardings from logical axis names -> restore or init -> jitted
`train_step` (pure, donated state, in/out shardings) -> loop with logging, periodic eval and
async checkpoints -> final checkpoint and evaluation.

Model families plug in through `vlm_jax.tasks.base.Task`; nothing here knows about SAT,
BLIP-2 or Flamingo.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_lib, sharding
from vlm_jax import flops as flops_lib
from vlm_jax.tasks import make_task
from vlm_jax.tasks.base import Task

log = logging.getLogger("vlm_jax")


@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # [] int32
    params: Any                     # unboxed parameter pytree
    opt_state: Any                  # optax state (no slots for frozen params)
    model_state: Any                # non-gradient state (BatchNorm stats, REINFORCE baseline, ...)


# ----------------------------------------------------------------------------- optimizer
def make_schedule(config) -> optax.Schedule:
    o, steps = config.optim, config.train.num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
        decay_steps=max(steps, o.warmup_steps + 1), end_value=o.lr * o.end_lr_fraction)


def _decay_mask(params):
    """Weight decay on matrices/kernels only (not biases, norms, gates, scalars)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, labels) -> optax.GradientTransformation:
    """AdamW + warmup/cosine + global-norm clipping on trainable params; frozen params get no update
    and no optimizer slots (`optax.multi_transform`). Their gradients are never consumed, so XLA
    drops their computation."""
    o = config.optim
    trainable = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(make_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=_decay_mask),
    )
    return optax.multi_transform({"train": trainable, "freeze": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- state
@dataclasses.dataclass
class Setup:
    """Everything derived from (config, task, mesh) that the loop and tests need."""
    task: Task
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    labels: Any
    abstract_state: TrainState          # ShapeDtypeStructs with .sharding
    state_sharding: TrainState
    init_fn: Callable[[jax.Array], TrainState]
    train_step: Callable                # jitted (state, batch, rng) -> (state, metrics)
    step_flops: Callable[[], flops_lib.FlopCount]   # dot/conv FLOPs of one global-batch step (traced)


def _unbox_abstract_and_specs(task: Task, rng, batch):
    boxed = jax.eval_shape(task.init, rng, batch)
    specs = nn.get_partition_spec(boxed)
    return nn.meta.unbox(boxed), specs


def setup(config, task: Task, mesh) -> Setup:
    """Build optimizer, abstract state, shardings and the jitted train step. Compiles nothing yet."""
    local = task.example_batch(1)       # shapes only: params do not depend on the batch size
    rng = jax.random.key(config.seed)
    abstract_vars, specs = _unbox_abstract_and_specs(task, rng, local)
    labels = task.param_labels(abstract_vars["params"])
    tx = make_optimizer(config, labels)

    param_sh = sharding.shardings_for(abstract_vars["params"], specs["params"], mesh)
    mstate_sh = sharding.shardings_for(abstract_vars["model_state"], specs["model_state"], mesh)
    repl = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_vars["params"])
    opt_sh = _opt_state_shardings(abstract_opt, abstract_vars["params"], param_sh, repl)
    state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh, model_state=mstate_sh)

    def init_fn(rng) -> TrainState:
        variables = nn.meta.unbox(task.init(rng, local))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state=variables["model_state"])

    abstract_state = jax.eval_shape(init_fn, rng)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_sh)

    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in local.items()}
    step_fn = functools.partial(_train_step, task=task, tx=tx, labels=labels)
    train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                         donate_argnums=(0,))

    def step_flops() -> flops_lib.FlopCount:
        """Traces (does not run) one step on the global batch shape."""
        bs = config.train.batch_size
        batch = {k: jax.ShapeDtypeStruct((bs,) + np.shape(v)[1:], np.asarray(v).dtype) for k, v in local.items()}
        plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_state)
        return flops_lib.count(step_fn, plain, batch, jax.random.key(0))

    return Setup(task, mesh, tx, labels, abstract_state, state_sh,
                 jax.jit(init_fn, out_shardings=state_sh), train_step, step_flops)


def _opt_state_shardings(abstract_opt, abstract_params, param_sh, default):
    """Optimizer slots (mu, nu, ...) take the sharding of the parameter they mirror.

    A slot mirrors a parameter when the parameter's key path is a suffix of the slot's path and
    the shapes agree; everything else (counts, scalars) is replicated.
    """
    by_path = {}
    for (path, p), (_, sh) in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                  jax.tree_util.tree_leaves_with_path(param_sh)):
        by_path[tuple(path)] = (p.shape, sh)
    lengths = sorted({len(k) for k in by_path}, reverse=True)

    def one(path, leaf):
        for n in lengths:
            hit = by_path.get(tuple(path[-n:])) if len(path) >= n else None
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def _train_step(state: TrainState, batch, rng, *, task: Task, tx, labels):
    """One optimizer step. Pure: (state, batch, rng) -> (new state, metrics)."""
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        return task.loss_fn(params, state.model_state, batch, rng, train=True)

    (loss, (metrics, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    trainable = jax.tree.map(lambda g, l: g if l == "train" else None, grads, labels)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(trainable)
    metrics["param_norm"] = optax.tree.norm(params)
    metrics["loss"] = loss
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      model_state=new_model_state), metrics


# ----------------------------------------------------------------------------- logging
class MetricLogger:
    """stdout + TensorBoard (tensorboardX, no TensorFlow) + metrics.jsonl in the workdir."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if v is not None and np.isscalar(v) and np.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix,
                                     **{k: (float(v) if v is not None else None) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if isinstance(v, (int, float)))


# ----------------------------------------------------------------------------- entry point
def prepare(config, workdir: str, *, save_config: bool = True):
    """Validate, build tokenizer/task/mesh. Returns (config, tokenizer, task, mesh).

    `save_config=False` (eval) leaves the training run's `<workdir>/config.json` untouched."""
    num_devices = jax.device_count()
    shape = config_lib.validate_common(config, num_devices, jax.process_count())
    from vlm_jax.tasks import task_module
    module = task_module(config.task)
    if hasattr(module, "validate"):
        module.validate(config)
    os.makedirs(workdir, exist_ok=True)
    from vlm_jax.data import pipeline
    tokenizer = pipeline.get_tokenizer(config, workdir)
    config.unlock()
    config.model.vocab_size = tokenizer.vocab_size
    config.lock()
    if save_config and jax.process_index() == 0:
        config_lib.save_config(config, workdir)
    task = make_task(config)
    mesh = sharding.create_mesh(shape)
    return config, tokenizer, task, mesh


def checkpoint_meta(config) -> dict:
    return {"task": config.task, "vocab_size": int(config.model.vocab_size),
            "jax": jax.__version__, "flax": flax.__version__}


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint), then evaluate the final state."""
    result = train(config, workdir)
    if result.stopped_early:
        return {}
    metrics = result.task.evaluate(result.state.params, result.state.model_state, workdir=workdir,
                                   step=result.step, mesh=result.mesh, tokenizer=result.tokenizer, final=True)
    if jax.process_index() == 0:
        logger = MetricLogger(workdir)
        logger.scalars(result.step, metrics, prefix="eval")
        logger.close()
    return metrics


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    stopped_early: bool
    task: Task
    mesh: Any
    tokenizer: Any
    train_iter: Any
    config: Any


def train(config, workdir: str, *, stop_at: int | None = None) -> TrainResult:
    """The training loop. `stop_at` stops (with a checkpoint) before `train.num_steps`, as a
    preemption would; rerunning resumes exactly where it stopped."""
    config, tokenizer, task, mesh = prepare(config, workdir)
    from vlm_jax.data import pipeline
    is_main = jax.process_index() == 0
    logger = MetricLogger(workdir, enabled=is_main)
    s = setup(config, task, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    train_iter = pipeline.make_train_iterator(config, tokenizer)
    restored = ckpt.restore(s.abstract_state, expect_meta={"task": config.task,
                                                           "vocab_size": int(config.model.vocab_size)})
    if restored is None:
        t0 = time.time()
        state = s.init_fn(jax.random.key(config.seed))
        log.info("initialised %s params in %.1fs", _count(state.params), time.time() - t0)
    else:
        step0, state, data_state, _ = restored
        train_iter.set_state(data_state)
        log.info("resumed from step %d in %s", step0, ckpt.directory)

    n_params = _count(state.params)
    n_train = _count(jax.tree.map(lambda p, l: p if l == "train" else None, state.params, s.labels))
    log.info("task=%s params=%s trainable=%s mesh=%s devices=%d", config.task, f"{n_params:,}",
             f"{n_train:,}", dict(mesh.shape), jax.device_count())
    fc = s.step_flops()
    peak = flops_lib.peak_tflops(jax.devices()[0], float(config.train.get("peak_tflops", 0.0)))
    log.info("model FLOPs per step (dot/conv, traced): %.4g%s; MFU against %s", fc.flops,
             f" ({fc.while_loops} while_loop bodies counted once)" if fc.while_loops else "",
             f"{peak:g} TFLOP/s per device" if peak else "no known peak (set --config.train.peak_tflops)")

    preempted = {"flag": False, "local": False}   # local: this process got SIGTERM; flag: all agree

    def on_sigterm(signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting.")
        preempted["local"] = True

    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None

    rng = jax.random.key(config.seed + 1)
    num_steps = config.train.num_steps
    start = int(jax.device_get(state.step))
    meta = checkpoint_meta(config)
    progress = _progress(start, num_steps, enabled=is_main)
    window_t, window_ex, pending = time.time(), 0, []
    step = start
    compile_done = False
    stop = min(num_steps, stop_at) if stop_at is not None else num_steps
    try:
        while step < stop:
            local = next(train_iter)
            batch = sharding.put_batch(local, mesh)
            state, metrics = s.train_step(state, batch, rng)
            step += 1
            pending.append(metrics)
            window_ex += config.train.batch_size
            progress.update(1)
            if not compile_done:  # keep compilation out of the throughput numbers
                jax.block_until_ready(metrics)
                compile_done = True
                log.info("first step (incl. compilation) took %.1fs", time.time() - window_t)
                window_t, window_ex, pending = time.time(), 0, []
            elif step % config.train.log_every == 0 or step == stop:
                host = jax.device_get(pending)
                dt = time.time() - window_t
                values = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                toks = sum(float(m.get("num_tokens", 0.0)) for m in host)
                values["examples_per_sec"] = window_ex / dt
                if toks:
                    values["tokens_per_sec"] = toks / dt
                values["model_tflops"] = fc.flops * len(host) / dt / 1e12      # all devices together
                if peak:
                    values["mfu"] = values["model_tflops"] / (peak * jax.device_count())
                values["learning_rate"] = float(make_schedule(config)(step - 1))  # the rate the last update used
                if not np.isfinite(values["loss"]):
                    raise FloatingPointError(f"loss is {values['loss']} at step {step}; not saving. Lower "
                                             "--config.optim.lr or check the data.")
                logger.scalars(step, values)
                eta = (stop - step) * dt / max(len(host), 1)
                progress.write(f"step {step}/{num_steps} eta {eta / 60:.1f}min " + _fmt(values))
                window_t, window_ex, pending = time.time(), 0, []
            if jax.process_count() == 1:
                preempted["flag"] = preempted["local"]
            elif step % config.train.log_every == 0 or step == stop:
                # Agree on preemption across hosts at log boundaries, so every process saves the
                # same step (a signal may reach only some hosts).
                from jax.experimental import multihost_utils
                flags = multihost_utils.process_allgather(np.asarray(preempted["local"], np.int32))
                preempted["flag"] = bool(np.max(flags))
            if (config.train.eval_every and step % config.train.eval_every == 0 and step < num_steps
                    and not preempted["flag"]):
                eval_metrics = task.evaluate(state.params, state.model_state, workdir=workdir, step=step,
                                             mesh=mesh, tokenizer=tokenizer)
                logger.scalars(step, eval_metrics, prefix="eval")
            if step % config.train.checkpoint_every == 0 or step == stop or preempted["flag"]:
                _check_finite(state, step)
                if not ckpt.save(step, state, data_state=train_iter.get_state(), meta=meta):
                    log.warning("checkpoint for step %d was not saved (Orbax declined it).", step)
            if preempted["flag"]:
                log.warning("stopped at step %d after SIGTERM; rerun the same command to resume.", step)
                break
    finally:
        progress.close()
        ckpt.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    logger.close()
    return TrainResult(state=state, step=step, stopped_early=preempted["flag"] or step < num_steps, task=task,
                       mesh=mesh, tokenizer=tokenizer, train_iter=train_iter, config=config)


@jax.jit
def _finite_flags(params) -> jax.Array:
    """One bool per parameter leaf, computed in one program (one host sync, not one per leaf)."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])


def _check_finite(state: TrainState, step: int) -> None:
    flags = np.asarray(jax.device_get(_finite_flags(state.params)))
    if not flags.all():
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
        bad = [p for p, ok in zip(paths, flags) if not ok]
        raise FloatingPointError(f"non-finite parameters at step {step} ({bad[:3]}...); not saving a checkpoint.")


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _progress:
    """tqdm with ETA on a terminal; plain log lines elsewhere."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            disable=not sys.stderr.isatty(), mininterval=1.0)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
