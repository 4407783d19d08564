"""The one trainer, shared by every model family.

    train.py --config configs/<family>.py:VARIANT --workdir DIR [--config.key=value ...]

Flow: validate config -> mesh -> task (`vlm_jax.tasks`; it owns its tokenizer, data and
evaluators) -> `build_program` (optimizer groups, abstract state and shardings from logical axis
names, jitted init and train step, all traced under the mesh and its logical axis rules) ->
restore, or init + `config.init` sources (pretrained / previous-stage subtrees) -> loop with
logging, the task's evaluators at their periods and async checkpoints -> final checkpoint and
every evaluator.

Model families plug in through `vlm_jax.tasks.base.Task`; nothing here knows about SAT,
BLIP-2 or Flamingo.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
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
from vlm_jax import config_lib, errors, init_sources, optim, sharding
from vlm_jax import flops as flops_lib
from vlm_jax.tasks import make_task, task_module
from vlm_jax.tasks.base import Task

log = logging.getLogger("vlm_jax")
make_schedule = optim.make_schedule
@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # [] int32
    params: Any                     # trainable parameters (nested dict; optimizer groups with trainable=True)
    opt_state: Any                  # optax state over `params` only
    model_state: Any                # non-gradient state (BatchNorm stats, REINFORCE baseline, ...)
    frozen: Any                     # frozen parameters: no gradient, no optimizer slots, saved once

    def full_params(self):
        """Trainable and frozen parameters in one tree (what the model's apply takes)."""
        return optim.merge(self.params, self.frozen)

    def checkpoint_item(self) -> dict:
        """What each step's checkpoint stores (frozen params are saved once, apart)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "model_state": self.model_state}


def state_from_item(item: dict, frozen) -> TrainState:
    return TrainState(step=item["step"], params=item["params"], opt_state=item["opt_state"],
                      model_state=item["model_state"], frozen=frozen)


# ----------------------------------------------------------------------------- program
@dataclasses.dataclass
class TrainProgram:
    """The jitted functions and shardings of one (config, task, mesh). Compiles lazily."""
    task: Task
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    labels: Any                         # group name per parameter (full tree)
    groups: dict                        # group name -> optim.ParamGroup
    abstract_state: TrainState          # ShapeDtypeStructs with .sharding
    state_sharding: TrainState
    variable_sharding: dict             # {'params', 'model_state'} shardings of the full variables
    batch_sharding: dict
    init_variables: Callable[[jax.Array], dict]        # rng -> full (unboxed) variables on the mesh
    state_from_variables: Callable[[dict], TrainState]  # split / cast / optimizer init
    train_step: Callable                # (state, batch, rng) -> (state, metrics), traced under the rules
    step_flops: Callable[..., flops_lib.FlopCount]  # dot/conv FLOPs of one global-batch step (traced)
    abstract_variables: dict            # {'params', 'model_state'}: ShapeDtypeStructs of the full variables
    init_variables_except: Callable[[tuple], Callable[[jax.Array], dict]]  # targets -> rng -> pruned variables

    def init_state(self, rng: jax.Array, sources=()) -> TrainState:
        """Random init, then every `config.init` source seeds its subtree, then the state.

        With sources, the random init skips the subtrees they seed (`init_sources.prune`): jit drops
        the dead random draws, so a stage that reads a large frozen tower from a checkpoint or HF
        compiles and runs the init of the new modules only. Every other leaf gets exactly the
        value the full init gives it (flax derives each parameter's key from its module path)."""
        sources = list(sources)
        targets = tuple(sorted({s.target for s in sources}))     # () = the full random init
        variables = self.init_variables_except(targets)(rng)
        variables = init_sources.unprune(variables, self.abstract_variables, targets)  # seeded: ShapeDtypeStructs
        variables = init_sources.apply_sources(variables, sources, self.variable_sharding)
        init_sources.check_all_seeded(variables, targets)
        return self.state_from_variables(variables)

    def abstract_checkpoint_item(self) -> dict:
        return self.abstract_state.checkpoint_item()


def _traced_under_rules(fn, mesh):
    """``fn`` called inside `sharding.rules_context` (jit traces on the first call, so the
    activation constraints in the model see the mesh and the logical axis rules)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sharding.rules_context(mesh):
            return fn(*args, **kwargs)
    return wrapper


def build_program(config, task: Task, mesh) -> TrainProgram:
    """Optimizer, abstract state, shardings and the jitted init / train step. Compiles nothing."""
    local = task.example_batch(1)       # shapes only: params do not depend on the batch size
    rng = jax.random.key(config.seed)
    with sharding.rules_context(mesh):
        boxed = jax.eval_shape(task.init, rng, local)
    specs = nn.get_partition_spec(boxed)
    abstract_vars = nn.meta.unbox(boxed)

    config_groups = optim.groups_from_config(config)
    task_groups = list(task.param_groups())
    labels = optim.assign_groups(abstract_vars["params"], config_groups, task_groups)
    optim.check_groups_claim(labels, config_groups)
    table = optim.group_table(config_groups, task_groups)
    trainable = jax.tree.map(lambda l: table[l].trainable, labels)
    train_labels, _ = optim.split(labels, trainable)
    tx = optim.make_optimizer(config, train_labels, table)

    var_sh = {"params": sharding.shardings_for(abstract_vars["params"], specs["params"], mesh),
              "model_state": sharding.shardings_for(abstract_vars["model_state"], specs["model_state"], mesh)}
    repl = sharding.replicated(mesh)
    train_sh, frozen_sh = optim.split(var_sh["params"], trainable)

    def state_from_variables(variables) -> TrainState:
        params = optim.cast_groups(variables["params"], labels, table)
        tr, fr = optim.split(params, trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), params=tr, opt_state=tx.init(tr),
                          model_state=variables["model_state"], frozen=fr)

    abstract_plain = jax.eval_shape(state_from_variables, abstract_vars)
    opt_sh = _opt_state_shardings(abstract_plain.opt_state, abstract_plain.params, train_sh, repl)
    state_sh = TrainState(step=repl, params=train_sh, opt_state=opt_sh, model_state=var_sh["model_state"],
                          frozen=frozen_sh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_plain, state_sh)

    batch_sh = sharding.batch_shardings(local, mesh, task.batch_axes())
    accum = int(config.optim.get("grad_accum_steps", 1) or 1)
    step_fn = functools.partial(_train_step, task=task, tx=tx, accum=accum, guard=DivergenceGuard.from_config(config))
    train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                         donate_argnums=(0,))
    @functools.lru_cache(maxsize=None)
    def init_variables_except(targets: tuple) -> Callable[[jax.Array], dict]:
        """rng -> the variables without the subtrees at ``targets`` (None there), jitted; () = all of them."""
        prune = functools.partial(init_sources.prune, targets=targets)
        fn = jax.jit(lambda r: prune(nn.meta.unbox(task.init(r, local))), out_shardings=prune(var_sh))
        return _traced_under_rules(fn, mesh)

    def step_flops(*step_args) -> flops_lib.FlopCount:
        """Traces (does not run) one step on the global batch shape. Given the step's own arguments
        ``(state, batch, rng)`` (arrays or ShapeDtypeStructs), it counts the jitted step's own trace,
        which jit keeps for its first call with those arguments: the trainer traces the step once,
        not twice (~2 s of every run's start on a tiny config, 2-core CPU)."""
        if step_args:
            with sharding.rules_context(mesh):
                return flops_lib.count_jaxpr(train_step.trace(*step_args).jaxpr)
        example = task.example_batch(config.train.batch_size)
        batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype), example)
        plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_state)
        with sharding.rules_context(mesh):
            return flops_lib.count(step_fn, plain, batch, jax.random.key(0))

    return TrainProgram(
        task=task, mesh=mesh, tx=tx, labels=labels, groups=table, abstract_state=abstract_state,
        state_sharding=state_sh, variable_sharding=var_sh, batch_sharding=batch_sh,
        init_variables=init_variables_except(()),
        state_from_variables=_traced_under_rules(
            jax.jit(state_from_variables, out_shardings=state_sh, donate_argnums=(0,)), mesh),
        train_step=_traced_under_rules(train_step, mesh), step_flops=step_flops,
        abstract_variables=abstract_vars, init_variables_except=init_variables_except)


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


def _microbatches(batch, k: int):
    """[B, ...] leaves -> [k, B/k, ...]: microbatch i holds rows i, i+k, i+2k, ... so that every
    microbatch keeps the batch's split over the devices (rows stay on their device)."""
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"a batch leaf of {x.shape[0]} rows cannot be split into optim.grad_accum_steps={k} "
                             "microbatches; make the batch size a multiple of it.")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def loss_and_grads(state: TrainState, batch, rng, *, task: Task, accum: int = 1):
    """-> (loss, metrics, new model state, gradients of the trainable params).

    Gradients are taken for the trainable params only (frozen ones enter as constants, so their
    gradient matmuls are never traced). With ``accum > 1`` the batch is split into that many
    microbatches (`_microbatches`) whose gradients, losses and metrics are averaged
    ('num_tokens' summed); the model state threads through them in order."""
    def loss_fn(trainable, model_state, batch, rng):
        params = optim.merge(trainable, state.frozen)
        return task.loss_fn(params, model_state, batch, rng, train=True)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, (metrics, new_model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
        return loss, metrics, new_model_state, grads

    def body(carry, micro):
        acc, model_state, i = carry
        (l, (m, model_state)), g = grad_fn(state.params, model_state, micro, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, acc, g), model_state, i + 1), (l, m)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, new_model_state, _), (losses, per_micro) = jax.lax.scan(
        body, (zeros, state.model_state, jnp.zeros((), jnp.int32)), _microbatches(batch, accum))
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = {k: (jnp.sum(v) if k == "num_tokens" else jnp.mean(v, axis=0)) for k, v in per_micro.items()}
    return jnp.mean(losses), metrics, new_model_state, grads


@dataclasses.dataclass(frozen=True)
class DivergenceGuard:
    """The per-step health check of the train step (computed on device, read by the host only at
    log boundaries and before a save, so it costs no extra host sync).

    A step is *diverged* when its loss, any logged term, the gradient norm, the parameter norm or
    the update norm is non-finite, or the parameter / update norm exceeds ``max_param_norm`` /
    ``max_update_norm`` (0 = no limit). ``skip``: such a step leaves params, optimizer and model
    state unchanged (the batch is consumed and counted in the logged ``diverged`` fraction);
    otherwise the run stops with `DivergenceError` before anything after it is saved.
    Config: ``train.max_param_norm``, ``train.max_update_norm``, ``train.on_divergence`` ('stop' |
    'skip'); configs without these keys get the defaults (no limits, stop)."""
    max_param_norm: float = 0.0
    max_update_norm: float = 0.0
    skip: bool = False

    @classmethod
    def from_config(cls, config) -> "DivergenceGuard":
        t = config.train
        mode = t.get("on_divergence", "stop")
        if mode not in DIVERGENCE_MODES:
            raise config_lib.ConfigError(f"config.train.on_divergence={mode!r}; use one of {DIVERGENCE_MODES}.")
        return cls(max_param_norm=float(t.get("max_param_norm", 0.0)),
                   max_update_norm=float(t.get("max_update_norm", 0.0)), skip=mode == "skip")


DIVERGENCE_MODES = ("stop", "skip")


class DivergenceError(FloatingPointError):
    """Training diverged; the message names the step, the terms that went non-finite (or the norm
    that exceeded its limit) and the knobs to turn. Nothing from that step on was saved."""


def _train_step(state: TrainState, batch, rng, *, task: Task, tx, accum: int = 1,
                guard: DivergenceGuard = DivergenceGuard()):
    """One optimizer step. Pure: (state, batch, rng) -> (new state, metrics); gradients from
    `loss_and_grads`, then the optimizer update, the task's `constrain_params` and the
    `DivergenceGuard` (metrics ``update_norm`` and ``diverged``)."""
    rng = jax.random.fold_in(rng, state.step)
    loss, metrics, new_model_state, grads = loss_and_grads(state, batch, rng, task=task, accum=accum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = task.constrain_params(optax.apply_updates(state.params, updates))
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    metrics["update_norm"] = optax.tree.norm(jax.tree.map(jnp.subtract, params, state.params))
    metrics["loss"] = loss
    healthy = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
    if guard.max_param_norm > 0:
        healthy &= metrics["param_norm"] <= guard.max_param_norm
    if guard.max_update_norm > 0:
        healthy &= metrics["update_norm"] <= guard.max_update_norm
    metrics["diverged"] = 1.0 - healthy.astype(jnp.float32)
    if guard.skip:     # a diverged step changes nothing but the step counter
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(healthy, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        new_model_state = keep(new_model_state, state.model_state)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      model_state=new_model_state, frozen=state.frozen), metrics


def check_divergence(unchecked: list, guard: DivergenceGuard) -> None:
    """Raise `DivergenceError` for the first diverged step among ``unchecked`` [(step, metrics)]
    (device arrays; fetched here, at a log boundary or before a save). Skip mode only counts."""
    if guard.skip or not unchecked:
        return
    flags = np.asarray(jax.device_get([m["diverged"] for _, m in unchecked]))
    if not flags.any():
        return
    step, m = unchecked[int(np.argmax(flags > 0))]
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    bad = [k for k, v in m.items() if not np.isfinite(v) and k != "diverged"]
    terms = [k for k in bad if k not in ("loss", "grad_norm", "param_norm", "update_norm")]
    if bad:
        what = (f"non-finite {', '.join(terms)} (and {', '.join(k for k in bad if k not in terms)})" if terms
                else f"non-finite {', '.join(bad)}")
        hint = (f"the term(s) {', '.join(terms)} went non-finite first-hand: check their weights in config.model "
                "and the inputs of that batch, " if terms else "")
    elif guard.max_param_norm > 0 and m["param_norm"] > guard.max_param_norm:
        what, hint = (f"parameter norm {m['param_norm']:.4g} > --config.train.max_param_norm={guard.max_param_norm:g}",
                      "")
    else:
        what, hint = (f"update norm {m['update_norm']:.4g} > --config.train.max_update_norm={guard.max_update_norm:g}",
                      "")
    raise DivergenceError(
        f"training diverged at step {step}: {what} (loss={m['loss']:.4g}, grad_norm={m['grad_norm']:.4g}). "
        f"Nothing from step {step} on was saved; the last checkpoint is the latest good state. Fix: {hint}lower "
        "--config.optim.lr or set --config.optim.grad_clip, or skip such batches with "
        "--config.train.on_divergence=skip.")


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
def make_task_and_mesh(config, workdir: str | None):
    """Validate the config (common keys, then the task module's own `validate`), build the mesh
    and the task, and call `Task.prepare()` (which may write the task's tokenizer files into a
    workdir that has none, e.g. SAT's vocab.json). Returns (task, mesh)."""
    shape = config_lib.validate_common(config, jax.device_count(), jax.process_count())
    module = task_module(config.task)
    if hasattr(module, "validate"):
        module.validate(config)
    optim.groups_from_config(config)
    init_sources.sources_from_config(config)
    mesh = sharding.create_mesh(shape)
    task = make_task(config, workdir=workdir, mesh=mesh)
    task.prepare()
    return task, mesh


def checkpoint_meta(config, task: Task) -> dict:
    return {"task": config.task, **task.checkpoint_meta(), "jax": jax.__version__, "flax": flax.__version__}


def expected_meta(config, task: Task) -> dict:
    return {"task": config.task, **task.checkpoint_meta()}


class PreemptionAgreement:
    """Agree across processes, at every step, on whether any of them got SIGTERM, without a
    blocking host round trip per step.

    `update(local)` launches this step's all-reduce (max over one flag per device, each process
    filling its own devices) asynchronously and returns the result launched at the previous call,
    which by then has (almost always) finished: reading it waits at most for the previous train
    step, which the host has already queued the current one behind. Every process issues the same
    collectives in the same order and reads the same result at the same step, so all of them stop
    and save the same step: a signal at step n stops everyone after step n + 1 (or n + 2).
    """

    def __init__(self, mesh):
        from jax.sharding import NamedSharding, PartitionSpec
        self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        self._shape = (mesh.devices.size,)
        self._reduce = jax.jit(lambda f: jnp.max(f), out_shardings=sharding.replicated(mesh))
        self._pending = None

    def update(self, local: bool) -> bool:
        previous = self._pending
        value = np.full((1,), int(local), np.int32)
        flags = jax.make_array_from_single_device_arrays(
            self._shape, self._sharding,
            [jax.device_put(value, d) for d in self._sharding.addressable_devices])   # one flag per device
        self._pending = self._reduce(flags)
        return bool(previous is not None and int(jax.device_get(previous)))


def restore_state(program: TrainProgram, ckpt: ckpt_lib.Checkpointer, config, task: Task, *,
                  step: int | None = None, data_state: bool = True, set_aside_unreadable: bool = True):
    """-> (step, state, data_state) from the workdir's checkpoint, or None when there is none.

    The frozen params come from the workdir's frozen_params/ (written once); if that is missing
    they are rebuilt from the random init and `config.init` (deterministic), with a warning.
    `set_aside_unreadable`: see `Checkpointer.restore` (evaluation passes False)."""
    restored = ckpt.restore(program.abstract_checkpoint_item(), step=step, data_state=data_state,
                            expect_meta=expected_meta(config, task), set_aside_unreadable=set_aside_unreadable)
    if restored is None:
        return None
    step0, item, data, _ = restored
    frozen = ckpt.restore_frozen(program.abstract_state.frozen)
    if frozen is None:
        log.warning("%s is missing: rebuilding the frozen parameters from the init (seed %d) and config.init.",
                    ckpt.frozen_directory, config.seed)
        frozen = program.init_state(jax.random.key(config.seed),
                                    init_sources.sources_from_config(config)).frozen
    return step0, state_from_item(item, frozen), data


def run_evaluators(task: Task, state: TrainState, *, workdir: str, step: int, final: bool,
                   only_due: bool = False) -> dict[str, dict[str, float]]:
    """Run the task's evaluators (all, or with ``only_due`` those whose period divides ``step``)
    -> {evaluator name: metrics}."""
    out = {}
    params = state.full_params()
    for ev in task.evaluators():
        if only_due and not (ev.every and step % ev.every == 0):
            continue
        with sharding.rules_context(task.mesh):
            out[ev.name] = ev.run(params, state.model_state, step=step, workdir=workdir, final=final)
    return out


def train_and_evaluate(config, workdir: str) -> dict[str, dict[str, float]]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint), then run every evaluator
    on the final state. -> {evaluator name: metrics} ({} when stopped early)."""
    result = train(config, workdir)
    if result.stopped_early:
        return {}
    return final_evaluation(result, workdir)


def final_evaluation(result: "TrainResult", workdir: str) -> dict[str, dict[str, float]]:
    """Every evaluator on a finished run's final state, logged -> {evaluator name: metrics}
    (train.py calls `train` and this itself, to exit with its own code when stopped early)."""
    metrics = run_evaluators(result.task, result.state, workdir=workdir, step=result.step, final=True)
    if jax.process_index() == 0:
        logger = MetricLogger(workdir)
        for name, values in metrics.items():
            logger.scalars(result.step, values, prefix=f"eval/{name}")
        logger.close()
    return metrics


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    stopped_early: bool
    task: Task
    mesh: Any
    train_iter: Any
    config: Any
    program: TrainProgram
    preempted: bool = False       # stopped by SIGTERM (on any process): resumable, train.py exits 75


def train(config, workdir: str, *, stop_at: int | None = None) -> TrainResult:
    """The training loop. `stop_at` stops (with a checkpoint) before `train.num_steps`, as a
    preemption would; rerunning resumes exactly where it stopped.

    Before anything is written the workdir must be a writable directory with room for one
    checkpoint (`vlm_jax.errors`: WorkdirError / DiskFullError, each a one-message error)."""
    errors.check_workdir(workdir)          # a file, unwritable, read-only, no free space: refused here
    task, mesh = make_task_and_mesh(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    program = build_program(config, task, mesh)
    errors.check_room_for_checkpoint(workdir, program.abstract_state)   # reliability: before any save
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    restored = restore_state(program, ckpt, config, task)
    if is_main:   # only now: a refused workdir keeps the config.json of the run that wrote it
        config_lib.save_config(config, workdir)
    logger = MetricLogger(workdir, enabled=is_main)
    train_iter = task.train_iterator()
    if restored is None:
        t0 = time.time()
        sources = init_sources.sources_from_config(config)
        state = program.init_state(jax.random.key(config.seed), sources)
        log.info("initialised %s params in %.1fs%s", f"{_count(state.full_params()):,}", time.time() - t0,
                 f" ({len(sources)} subtree(s) from config.init)" if sources else "")
        if ckpt.has_frozen():
            ckpt.set_aside_frozen()
        ckpt.save_frozen(state.frozen)
    else:
        step0, state, data_state = restored
        train_iter.set_state(data_state)
        log.info("resumed from step %d in %s", step0, ckpt.directory)

    n_train, n_frozen = _count(state.params), _count(state.frozen)
    log.info("task=%s params=%s trainable=%s frozen=%s mesh=%s devices=%d", config.task,
             f"{n_train + n_frozen:,}", f"{n_train:,}", f"{n_frozen:,}", dict(mesh.shape), jax.device_count())
    peak = flops_lib.peak_tflops(jax.devices()[0], float(config.train.get("peak_tflops", 0.0)))
    fc = None      # the step's FLOPs, counted from its own trace before the first step (step_flops)

    preempted = {"flag": False, "local": False}   # local: this process got SIGTERM; flag: all agree

    def on_sigterm(signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting.")
        preempted["local"] = True

    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None
    agreement = PreemptionAgreement(mesh) if jax.process_count() > 1 else None

    # the step's rng, replicated on every device of the mesh (made by a jitted program, so each process
    # creates its own shards: a device_put of a host value cannot target another process's devices)
    rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=sharding.replicated(mesh))()
    num_steps = config.train.num_steps
    start = int(jax.device_get(state.step))
    meta = checkpoint_meta(config, task)
    schedule = optim.make_schedule(config)
    progress = _progress(start, num_steps, enabled=is_main)
    window_t, window_ex, pending = time.time(), 0, []
    guard, unchecked = DivergenceGuard.from_config(config), []     # (step, metrics) not yet health-checked
    step = start
    compile_done = False
    stop = min(num_steps, stop_at) if stop_at is not None else num_steps
    try:
        while step < stop:
            local = next(train_iter)
            batch = sharding.put_batch(local, mesh, program.batch_sharding)
            if fc is None:   # traces the step; its first call below reuses that trace
                fc = program.step_flops(state, batch, rng)
                log.info("model FLOPs per step (dot/conv, traced): %.4g%s; MFU against %s", fc.flops,
                         f" ({fc.while_loops} while_loop bodies counted once)" if fc.while_loops else "",
                         f"{peak:g} TFLOP/s per device" if peak else "no known peak (set --config.train.peak_tflops)")
            with jax.transfer_guard("disallow"):    # no hidden host<->device copies in the step
                state, metrics = program.train_step(state, batch, rng)
            step += 1
            pending.append(metrics)
            unchecked.append((step, metrics))
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
                values["learning_rate"] = float(schedule(step - 1))  # the base rate the last update used
                check_divergence(unchecked, guard)
                unchecked = []
                if guard.skip and values.get("diverged", 0.0) > 0:
                    log.warning("skipped %d diverged step(s) in the last %d (--config.train.on_divergence=skip).",
                                int(round(values["diverged"] * len(host))), len(host))
                logger.scalars(step, values)
                eta = (stop - step) * dt / max(len(host), 1)
                progress.write(f"step {step}/{num_steps} eta {eta / 60:.1f}min " + _fmt(values))
                window_t, window_ex, pending = time.time(), 0, []
            if agreement is None:
                preempted["flag"] = preempted["local"]
            else:     # every step, without waiting: the flags gathered after step n decide at step n + 1
                preempted["flag"] = agreement.update(preempted["local"])
            if step < num_steps and not preempted["flag"]:
                for name, values in run_evaluators(task, state, workdir=workdir, step=step, final=False,
                                                   only_due=True).items():
                    logger.scalars(step, values, prefix=f"eval/{name}")
            if step % config.train.checkpoint_every == 0 or step == stop or preempted["flag"]:
                check_divergence(unchecked, guard)     # before a save: never write a diverged state
                unchecked = []
                _check_finite(state, step)
                if not ckpt.save(step, state.checkpoint_item(), data_state=train_iter.get_state(), meta=meta):
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
                       mesh=mesh, train_iter=train_iter, config=config, program=program,
                       preempted=preempted["flag"])


@jax.jit
def _finite_flags(params) -> jax.Array:
    """One bool per parameter leaf, computed in one program (one host sync, not one per leaf)."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])


def _check_finite(state: TrainState, step: int) -> None:
    """Refuse to checkpoint non-finite trainable parameters (frozen ones never change)."""
    if not jax.tree.leaves(state.params):
        return
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
