"""The one trainer on Show, Attend and Tell (tiny): sharding equality, checkpoint/resume exactness,
mismatched-workdir errors and the end-to-end train -> eval job."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE, sat_config
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_lib, sharding, train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAT = os.path.join(ROOT, "configs", "sat.py")


tiny = sat_config


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                                                - np.asarray(y, np.float64)))), a, b)))


def test_sharded_step_equals_single_device(data_dir, tmp_path):
    """Two train steps on a 2x2x2 mesh of 8 CPU devices == the same steps on one device (<= 1e-5)."""
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    config = tiny(data_dir)
    task, _ = train_lib.make_task_and_mesh(config, str(tmp_path))
    it = task.train_iterator()
    batches = [next(it) for _ in range(2)]
    results = []
    for shape, devices in (({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                           ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
        mesh = sharding.create_mesh(shape, devices)
        s = train_lib.build_program(config, task, mesh)
        state = s.init_state(jax.random.key(0))
        for b in batches:
            state, metrics = s.train_step(state, sharding.put_batch(b, mesh, s.batch_sharding), jax.random.key(1))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
        if shape["tensor"] == 2:  # the 8-device run really is sharded somewhere
            specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
            assert any(any(ax is not None for ax in spec) for spec in specs)
    (p1, m1), (p8, m8) = results
    assert _max_diff(p1, p8) <= 1e-5
    assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-5


def test_save_restore_identical_params_and_next_batch(data_dir, tmp_path):
    config = tiny(data_dir, train__num_steps=4)
    result = train_lib.train(config, str(tmp_path), stop_at=2)
    assert result.stopped_early and result.step == 2
    expected_next = next(result.train_iter)

    config2 = tiny(data_dir, train__num_steps=4)
    task, mesh = train_lib.make_task_and_mesh(config2, str(tmp_path))
    s = train_lib.build_program(config2, task, mesh)
    ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    step, state, data_state = train_lib.restore_state(s, ck, config2, task)
    assert ck.read_meta(step)["task"] == "sat"
    ck.close()
    assert step == 2
    assert _max_diff(jax.device_get(state.params), jax.device_get(result.state.params)) == 0.0
    assert _max_diff(jax.device_get(state.opt_state), jax.device_get(result.state.opt_state)) == 0.0
    it = task.train_iterator()
    it.set_state(data_state)
    got_next = next(it)
    for k in expected_next:
        np.testing.assert_array_equal(got_next[k], expected_next[k])


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    """N steps + restart + N steps == 2N uninterrupted steps (params and optimizer state)."""
    n = 3
    straight = train_lib.train(tiny(data_dir, train__num_steps=2 * n, train__checkpoint_every=100),
                               str(tmp_path / "straight"))
    first = train_lib.train(tiny(data_dir, train__num_steps=2 * n, train__checkpoint_every=100),
                            str(tmp_path / "resumed"), stop_at=n)
    assert first.step == n
    second = train_lib.train(tiny(data_dir, train__num_steps=2 * n, train__checkpoint_every=100),
                             str(tmp_path / "resumed"))
    assert second.step == 2 * n and not second.stopped_early
    assert _max_diff(jax.device_get(second.state.params), jax.device_get(straight.state.params)) <= 1e-6
    assert _max_diff(jax.device_get(second.state.opt_state), jax.device_get(straight.state.opt_state)) <= 1e-6


WORKERS_SCRIPT = """
import json, sys
import jax
import numpy as np
from vlm_jax import config_lib, train_lib


def cfg(steps):
    return config_lib.load_config(sys.argv[1] + ":tiny", {
        "data.data_dir": sys.argv[2], "data.worker_count": "2", "train.num_steps": str(steps),
        "train.checkpoint_every": "100", "mesh.data": "1"})


if __name__ == "__main__":          # grain worker processes re-import this module
    straight = train_lib.train(cfg(4), sys.argv[3] + "/straight")
    first = train_lib.train(cfg(4), sys.argv[3] + "/resumed", stop_at=2)
    second = train_lib.train(cfg(4), sys.argv[3] + "/resumed")
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(jax.device_get(straight.state.params)),
                               jax.tree.leaves(jax.device_get(second.state.params))))
    print("RESULT", json.dumps(dict(first=first.step, second=second.step, diff=diff)), flush=True)
"""


def test_grain_worker_processes_train_and_resume_exactly(data_dir, tmp_path):
    """data.worker_count=2 (grain worker processes): training runs, and 2 steps + restart +
    2 steps == 4 uninterrupted steps, so the workers' iterator state is checkpointed."""
    import subprocess
    import sys
    train_lib.make_task_and_mesh(tiny(data_dir), str(tmp_path / "prep"))[0].tokenizer   # dataset built once, here
    script = tmp_path / "workers.py"
    script.write_text(WORKERS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    out = subprocess.run([sys.executable, str(script), SAT, data_dir, str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert (r["first"], r["second"]) == (2, 4)
    assert r["diff"] <= 1e-6, r


def test_data_state_blobs_per_process():
    """One process: the blob round-trips; a checkpoint written by 2 processes (one iterator
    state each) cannot resume 1 process, with a message naming the fix."""
    for state in (b"\x00grain-state", {"pos": 3}):
        blob = ckpt_lib.gather_data_states(state)
        assert ckpt_lib.decode_data_state(json.loads(json.dumps(blob))) == state
    two = {"kind": "per_process", "value": [ckpt_lib.encode_data_state(b"a"), ckpt_lib.encode_data_state(b"b")]}
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="written by 2 processes.*resume with 2"):
        ckpt_lib.decode_data_state(two)


def test_workdir_with_other_model_gives_clear_error(data_dir, tmp_path):
    train_lib.train(tiny(data_dir, train__num_steps=2), str(tmp_path))
    wider = tiny(data_dir, train__num_steps=3, model__hidden_dim=48)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"different model.*fresh --workdir"):
        train_lib.train(wider, str(tmp_path))
    # A checkpoint whose metadata says another family.
    ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    meta = ck.read_meta(ck.latest_step())
    assert meta["task"] == "sat"
    other = tiny(data_dir, train__num_steps=2)
    task, mesh = train_lib.make_task_and_mesh(other, str(tmp_path))
    s = train_lib.build_program(other, task, mesh)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"task='sat' but this run has task='blip2'"):
        ck.restore(s.abstract_checkpoint_item(), expect_meta={"task": "blip2"})
    ck.close()


def test_end_to_end_train_and_eval_writes_everything(data_dir, tmp_path):
    """The main job on the tiny config: checkpoints, TensorBoard events, results/metrics JSON, PNGs;
    METEOR too (the tiny configs leave it out elsewhere: evals.caption.meteor)."""
    from vlm_jax.evaluation.captioning import java_available
    workdir = str(tmp_path)
    metrics = train_lib.train_and_evaluate(tiny(data_dir, train__peak_tflops=1000, evals__caption__meteor="true"),
                                           workdir)["caption"]
    for key in ("Bleu_4", "CIDEr", "ROUGE_L", "attribute_precision", "localization_rate"):
        assert key in metrics
    assert ("METEOR" in metrics) == java_available()
    ck = ckpt_lib.Checkpointer(workdir)
    assert ck.latest_step() == 4
    ck.close()
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.path.isfile(os.path.join(workdir, "config.json")) and os.path.isfile(os.path.join(workdir, "vocab.json"))
    out = os.path.join(workdir, "eval", "step_4")
    results = json.load(open(os.path.join(out, "results.json")))
    assert results and {"image_id", "caption"} <= set(results[0])
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["step"] == 4 and "CIDEr" in saved
    assert glob.glob(os.path.join(out, "attention_*.png"))
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train_lines = [l for l in lines if l["split"] == "train"]
    assert train_lines and {"loss", "grad_norm", "learning_rate", "examples_per_sec", "model_tflops",
                            "mfu"} <= set(train_lines[-1])
    last = train_lines[-1]
    assert last["model_tflops"] > 0
    assert last["mfu"] == pytest.approx(last["model_tflops"] / (1000 * jax.device_count()), rel=1e-6)

    # eval.py's path: reload the saved tokenizer + checkpoint and reproduce the final evaluation.
    from vlm_jax import eval_lib
    again = eval_lib.evaluate(tiny(data_dir), workdir)["caption"]
    for key in ("Bleu_4", "CIDEr", "ROUGE_L", "attribute_precision", "localization_rate"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9), key
    assert "METEOR" not in again                      # the tiny config's default


def test_step_flops_counts_forward_and_backward(data_dir, tmp_path):
    """The trainer's traced FLOPs of one step: those of the loss's value-and-gradient on the
    global batch (the optimizer update has no matmuls), between the forward pass's and three times
    it, scans multiplied out, linear in the batch size."""
    from vlm_jax import flops
    config = tiny(data_dir)
    task, mesh = train_lib.make_task_and_mesh(config, str(tmp_path))
    s = train_lib.build_program(config, task, mesh)
    step = s.step_flops()
    assert step.while_loops == 0
    bs = config.train.batch_size
    batch = {k: jax.ShapeDtypeStruct((bs,) + np.shape(v)[1:], np.asarray(v).dtype)
             for k, v in task.example_batch(1).items()}
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), s.abstract_state)
    assert not jax.tree.leaves(state.frozen)          # the tiny config trains everything
    fwd = flops.count_dot_flops(lambda p, m, b: task.loss_fn(p, m, b, jax.random.key(0), train=True)[0],
                                state.params, state.model_state, batch)
    grad = flops.count_dot_flops(jax.value_and_grad(lambda p, m, b: task.loss_fn(
        p, m, b, jax.random.key(0), train=True)[0]), state.params, state.model_state, batch)
    assert 0 < fwd < step.flops == grad
    assert step.flops <= 3 * fwd          # backward <= dX + dW per matmul/conv (images need no gradient)
    # what train() counts: the jitted step's own trace on the step's arguments (here abstract ones)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    assert s.step_flops(s.abstract_state, batch, key) == step
    # linear in the batch: half the batch, half the FLOPs
    half = train_lib.build_program(tiny(data_dir, train__batch_size=bs // 2), task, mesh).step_flops()
    assert half.flops * 2 == step.flops


def test_eval_without_training_gives_clear_error(data_dir, tmp_path):
    from vlm_jax import eval_lib
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoints/; train first"):
        eval_lib.evaluate(tiny(data_dir), str(tmp_path))


def test_eval_with_another_model_config_names_the_flags(data_dir, tmp_path):
    """A run trained with the paper's SAT model, evaluated with today's defaults: the mismatch
    error names the --config.model flags (read from the run's config.json) that rebuild it."""
    from vlm_jax import eval_lib
    paper = dict(model__position_embedding="none", model__attention_query="hidden")
    train_lib.train(tiny(data_dir, train__num_steps=2, **paper), str(tmp_path))
    assert eval_lib.model_differences(tiny(data_dir, **paper), str(tmp_path)) == []
    assert eval_lib.model_differences(tiny(data_dir), str(tmp_path)) == [
        "--config.model.attention_query=hidden", "--config.model.position_embedding=none"]
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"add --config.model.attention_query=hidden --config.model.position_embedding=none"):
        eval_lib.evaluate(tiny(data_dir), str(tmp_path))


def test_sigterm_saves_a_checkpoint_and_exits(data_dir, tmp_path):
    """Preemption: SIGTERM during training saves the current step and exits with 75 (EX_TEMPFAIL:
    stopped early, resumable; 0 is only for a finished run)."""
    import signal
    import subprocess
    import sys
    import time

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", f"{SAT}:tiny", "--workdir", workdir,
           f"--config.data.data_dir={data_dir}", "--config.train.num_steps=1000000",
           "--config.train.checkpoint_every=1000000", "--config.train.log_every=1000000"]
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 400
    for line in proc.stdout:  # wait until the first (compiled) step has run
        lines.append(line)
        if "first step" in line or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    log = "".join(lines) + out
    assert proc.returncode == 75, log[-3000:]
    assert "after SIGTERM" in log
    assert "Rerun the same command to resume" in log
    steps = ckpt_lib.Checkpointer(workdir).all_steps()
    assert len(steps) == 1 and 1 <= steps[0] < 1000000
    assert not os.path.isdir(os.path.join(workdir, "eval")), "a preempted run must not run the final evaluation"


def test_corrupted_latest_checkpoint_is_set_aside_and_training_saves_again(data_dir, tmp_path):
    workdir = str(tmp_path)
    train_lib.train(tiny(data_dir, train__num_steps=4, train__checkpoint_every=2), workdir)
    step4 = os.path.join(workdir, "checkpoints", "4")
    for f in glob.glob(os.path.join(step4, "state", "**", "*"), recursive=True):
        if os.path.isfile(f):
            open(f, "w").close()  # truncate every array file of the latest step
    result = train_lib.train(tiny(data_dir, train__num_steps=4, train__checkpoint_every=2), workdir)
    assert result.step == 4 and not result.stopped_early
    assert os.path.isdir(step4 + ".corrupt"), "the unreadable step is kept aside, not deleted"
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    assert ck.all_steps() == [2, 4]
    config = tiny(data_dir, train__num_steps=4)
    task, mesh = train_lib.make_task_and_mesh(config, workdir)
    restored = train_lib.restore_state(train_lib.build_program(config, task, mesh), ck, config, task)
    ck.close()
    assert restored[0] == 4
    assert _max_diff(jax.device_get(restored[1].params), jax.device_get(result.state.params)) == 0.0


def test_other_attention_variant_in_workdir_gives_clear_error(data_dir, tmp_path):
    """Same parameters, different model state (hard attention's REINFORCE baseline)."""
    train_lib.train(tiny(data_dir, train__num_steps=2), str(tmp_path))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"different model.*reinforce_baseline"):
        train_lib.train(tiny(data_dir, "tiny,attention=hard", train__num_steps=2), str(tmp_path))


def test_non_finite_parameters_block_the_checkpoint():
    import jax.numpy as jnp
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), opt_state=(), model_state={}, frozen={},
                                 params={"ok": jnp.ones(3), "bad": jnp.array([1.0, jnp.nan])})
    with pytest.raises(FloatingPointError, match=r"non-finite parameters at step 7 \(\[\"\['bad'\]\"\]"):
        train_lib._check_finite(state, 7)
    train_lib._check_finite(state.replace(params={"ok": jnp.ones(3)}), 7)


def test_step_without_tree_metadata_is_walked_back_not_called_a_config_mismatch(data_dir, tmp_path):
    """Deleting the latest step's state/_METADATA makes that step unreadable (corruption), which
    is walked back past; it used to be reported as 'written with another config'."""
    workdir = str(tmp_path)
    train_lib.train(tiny(data_dir, train__num_steps=4, train__checkpoint_every=2), workdir)
    meta = os.path.join(workdir, "checkpoints", "4", "state", "_METADATA")
    assert os.path.isfile(meta)
    os.remove(meta)
    config = tiny(data_dir, train__num_steps=4)
    task, mesh = train_lib.make_task_and_mesh(config, workdir)
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    restored = train_lib.restore_state(train_lib.build_program(config, task, mesh), ck, config, task)
    ck.close()
    assert restored[0] == 2
    # a real config difference in the optimizer state is still refused: freezing the encoder
    # removes its Adam slots
    frozen = tiny(data_dir, train__num_steps=4, model__freeze_encoder=True)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"different optimizer state|different model"):
        train_lib.train(frozen, workdir)
