"""The divergence guard of the train step (vlm_jax/train_lib.py `DivergenceGuard`): a non-finite
loss term or an exploded parameter norm is caught on device, the run stops before that state is
saved (naming the step and the term), or with train.on_divergence=skip the step changes nothing."""
import re

import jax
import numpy as np
import optax
import pytest

from conftest import sat_config
from test_engine import ToyTask, one_device_mesh, toy_batch, toy_config
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_lib, sharding, train_lib


def _step(config, batch, state=None):
    task = ToyTask(config)
    mesh = one_device_mesh()
    prog = train_lib.build_program(config, task, mesh)
    state = prog.init_state(jax.random.key(0)) if state is None else state
    before = jax.device_get(state)                  # the step donates its input state
    b = sharding.put_batch(batch, mesh, prog.batch_sharding)
    with sharding.rules_context(mesh):
        new, metrics = prog.train_step(state, b, jax.device_put(jax.random.key(1), sharding.replicated(mesh)))
    return before, new, metrics


def _with_train(config, **train):
    with config.unlocked():
        for k, v in train.items():
            config.train[k] = v
    return config


def test_a_non_finite_term_is_named_and_nothing_else_happens_on_a_good_step():
    good = toy_batch(8)
    _, _, m = _step(_with_train(toy_config()), good)
    assert float(m["diverged"]) == 0.0 and np.isfinite(float(m["update_norm"]))
    train_lib.check_divergence([(1, m)], train_lib.DivergenceGuard())        # no error

    bad = dict(good, target=np.where(np.arange(8) == 3, np.nan, good["target"]).astype(np.float32))
    _, _, m = _step(_with_train(toy_config()), bad)
    assert float(m["diverged"]) == 1.0
    with pytest.raises(train_lib.DivergenceError, match=r"diverged at step 7: non-finite mse") as e:
        train_lib.check_divergence([(6, jax.device_get(m) | {"diverged": 0.0}), (7, m)], train_lib.DivergenceGuard())
    assert "on_divergence=skip" in str(e.value)
    assert isinstance(e.value, FloatingPointError)        # train.py: "training diverged:", exit code 9


def test_skip_mode_leaves_the_state_unchanged_and_counts_the_step():
    good = toy_batch(8)
    bad = dict(good, target=np.full(8, np.nan, np.float32))
    config = _with_train(toy_config(), on_divergence="skip")
    old, new, m = _step(config, bad)
    assert float(m["diverged"]) == 1.0 and int(new.step) == int(old.step) + 1
    for a, b in zip(jax.tree.leaves((old.params, old.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    train_lib.check_divergence([(1, m)], train_lib.DivergenceGuard.from_config(config))   # skip: no error
    before, after, m2 = _step(config, good, state=new)                   # a good batch trains again
    assert float(m2["diverged"]) == 0.0
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))


def test_parameter_and_update_norm_limits():
    config = _with_train(toy_config(lr=10.0), max_param_norm=1.0)
    _, _, m = _step(config, toy_batch(8))
    assert float(m["param_norm"]) > 1.0 and float(m["diverged"]) == 1.0
    with pytest.raises(train_lib.DivergenceError, match=r"parameter norm .* > --config.train.max_param_norm=1"):
        train_lib.check_divergence([(1, m)], train_lib.DivergenceGuard.from_config(config))
    config = _with_train(toy_config(lr=10.0), max_update_norm=1e-3)
    _, _, m = _step(config, toy_batch(8))
    with pytest.raises(train_lib.DivergenceError, match=r"update norm .* > --config.train.max_update_norm"):
        train_lib.check_divergence([(1, m)], train_lib.DivergenceGuard.from_config(config))
    with pytest.raises(config_lib.ConfigError, match="on_divergence"):
        train_lib.DivergenceGuard.from_config(_with_train(toy_config(), on_divergence="ignore"))


def test_exploding_learning_rate_never_checkpoints_a_state_over_the_limit(data_dir, tmp_path):
    """Tiny SAT, a checkpoint every step, lr x 1000: the run stops with the divergence message and
    every checkpoint it left has a parameter norm within train.max_param_norm."""
    config = sat_config(data_dir, train__num_steps=12, train__checkpoint_every=1, train__log_every=4,
                        optim__lr=2.0, optim__grad_clip=0.0, optim__warmup_steps=0)
    task, mesh = train_lib.make_task_and_mesh(config, None)
    prog = train_lib.build_program(config, task, mesh)
    init_norm = float(optax.tree.norm(prog.init_state(jax.random.key(config.seed)).params))
    limit = 1.5 * init_norm
    with config.unlocked():
        config.train.max_param_norm = limit
    workdir = str(tmp_path / "run")
    with pytest.raises(train_lib.DivergenceError, match=r"training diverged at step \d+: parameter norm") as e:
        train_lib.train(config, workdir)
    bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    steps = ck.all_steps()
    ck.close()
    assert bad_step < 12 and all(s < bad_step for s in steps)       # nothing at or after the bad step
    if steps:
        task, mesh = train_lib.make_task_and_mesh(config, workdir)
        prog = train_lib.build_program(config, task, mesh)
        ck = ckpt_lib.Checkpointer(workdir, async_save=False)
        step, state, _ = train_lib.restore_state(prog, ck, config, task, data_state=False)
        ck.close()
        assert step == max(steps) and float(optax.tree.norm(state.params)) <= limit
