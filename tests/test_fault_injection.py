"""Fault injection: SIGKILL a training process during an asynchronous checkpoint save and again
during a plain step, resume each time, and compare the final parameters bitwise with an
uninterrupted run of the same config (tiny SAT, a checkpoint every step)."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import ROOT, SAT_CONFIG, sat_config
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import train_lib

STEPS = 12


def _cmd(workdir, data_dir):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", f"{SAT_CONFIG}:tiny", "--workdir", workdir,
            f"--config.data.data_dir={data_dir}", f"--config.train.num_steps={STEPS}",
            "--config.train.checkpoint_every=1", "--config.train.log_every=1"]


def _kill_when(workdir, data_dir, ready, *, what: str, timeout: float = 420) -> None:
    """Start train.py, SIGKILL it as soon as ``ready()`` holds (polled every 2 ms)."""
    env = dict(os.environ, PYTHONPATH=ROOT)       # the same XLA_FLAGS (8 CPU devices, opt level 0) as this process
    proc = subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"train.py exited ({proc.returncode}) before the kill {what}"
            assert time.time() < deadline, f"no moment to kill {what} within {timeout} s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _steps(workdir) -> set[int]:
    """Complete steps: Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it at the end."""
    d = os.path.join(workdir, "checkpoints")
    return {int(n) for n in os.listdir(d) if n.isdigit()} if os.path.isdir(d) else set()


def _final_params(config, workdir):
    task, mesh = train_lib.make_task_and_mesh(config, workdir)
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    restored = train_lib.restore_state(train_lib.build_program(config, task, mesh), ck, config, task,
                                       data_state=False)
    ck.close()
    assert restored[0] == STEPS
    return jax.device_get(restored[1].params)


def test_sigkill_during_async_save_and_during_a_step_resumes_bitwise(data_dir, tmp_path):
    config = sat_config(data_dir, train__num_steps=STEPS, train__checkpoint_every=1, train__log_every=1)
    ref_dir = str(tmp_path / "uninterrupted")
    train_lib.train(config, ref_dir)
    reference = _final_params(config, ref_dir)

    workdir = str(tmp_path / "killed")
    ckdir = os.path.join(workdir, "checkpoints")
    saving = lambda: bool(glob.glob(os.path.join(ckdir, "*orbax-checkpoint-tmp*")))  # noqa: E731
    # 1. during an async save, after a few complete steps exist
    _kill_when(workdir, data_dir, lambda: max(_steps(workdir), default=0) >= 3 and saving(), what="during a save")
    left = _steps(workdir)
    assert left and max(left) < STEPS and saving(), left       # the interrupted save is left behind
    # 2. resumed, killed again during a plain step: right after a save has finished (no tmp dir)
    seen = set(left)

    _kill_when(workdir, data_dir, lambda: bool(_steps(workdir) - seen) and not saving(), what="during a step")
    assert max(_steps(workdir)) < STEPS
    # 3. resumed to the end
    result = train_lib.train(config, workdir)
    assert result.step == STEPS and not result.stopped_early
    final = _final_params(config, workdir)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
