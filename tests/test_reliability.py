"""The reliability catalogue (docs/reliability.md): every failure a researcher can hit through
train.py / eval.py gives one message with its category and a documented exit code, and no good
data in the workdir changes (sha256 of config.json and every checkpoint file before and after).

The entry points are called in-process (`train.main(argv)`, `eval.main(argv)`: SystemExit with the
code, the message on stderr); one case runs eval.py as a subprocess to check the real process.
Tiny SAT config; one trained workdir (steps 2 and 4) is shared by the module and copied where a
case changes it.
"""
import errno
import gc
import hashlib
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import pytest

from conftest import FAST_COMPILE, ROOT, SAT_CONFIG, sat_config
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import errors, train_lib

train_cli = importlib.import_module("train")
eval_cli = importlib.import_module("eval")


# ----------------------------------------------------------------------------- helpers
def _argv(workdir, data_dir, *extra, steps=4, every=2):
    return ["--config", f"{SAT_CONFIG}:tiny", "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            f"--config.train.num_steps={steps}", f"--config.train.checkpoint_every={every}", *extra]


def _hashes(workdir) -> dict:
    """sha256 of every file under the workdir (config.json, vocab, every checkpoint file)."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _refused(entry, argv, capsys, code: int, *needles: str) -> str:
    """Run ``entry.main(argv)``, expect SystemExit(code) and each needle in stderr; -> stderr."""
    with pytest.raises(SystemExit) as exc:
        entry.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A workdir with checkpoints at steps 2 and 4 (tiny SAT) and its file hashes."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    result = train_lib.train(sat_config(data_dir, train__num_steps=4, train__checkpoint_every=2), workdir)
    assert result.step == 4 and not result.stopped_early
    assert ckpt_lib.Checkpointer(workdir, async_save=False).all_steps() == [2, 4]
    return workdir


@pytest.fixture
def copy_of(trained, tmp_path):
    def make():
        dst = str(tmp_path / "copy")
        shutil.copytree(trained, dst)
        return dst
    return make


# ----------------------------------------------------------------------------- workdirs
def test_workdir_is_a_file(data_dir, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    before = _hashes(tmp_path)
    err = _refused(train_cli, _argv(path, data_dir), capsys, errors.EXIT_UNWRITABLE,
                   "workdir error:", "is a file, not a directory")
    assert "Traceback" not in err
    assert _hashes(tmp_path) == before


def test_workdir_below_a_file(data_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes")
    before = _hashes(tmp_path)
    _refused(train_cli, _argv(tmp_path / "notes.txt" / "run", data_dir), capsys, errors.EXIT_UNWRITABLE,
             "cannot be created", "is a file, not a directory")
    assert _hashes(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_workdir_chmod(data_dir, tmp_path, capsys):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    workdir.chmod(0o500)
    try:
        _refused(train_cli, _argv(workdir, data_dir), capsys, errors.EXIT_UNWRITABLE,
                 "permission denied:", "is not writable")
        assert not os.listdir(workdir)
    finally:
        workdir.chmod(0o700)


def test_unwritable_workdir_simulated(data_dir, tmp_path, capsys, monkeypatch):
    """As the chmod case, for any user (root included): the permission check itself is faked."""
    workdir = tmp_path / "ro"
    workdir.mkdir()
    monkeypatch.setattr(errors, "_writable", lambda path: False)
    _refused(train_cli, _argv(workdir, data_dir), capsys, errors.EXIT_UNWRITABLE,
             "permission denied:", f"--workdir '{workdir}' is not writable", "chmod")
    assert not os.listdir(workdir)


def test_read_only_file_system_simulated(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(errors, "_writable", lambda path: False)
    monkeypatch.setattr(errors, "_read_only", lambda path: True)
    _refused(train_cli, _argv(tmp_path / "new_run", data_dir), capsys, errors.EXIT_UNWRITABLE,
             "read-only file system:", "where --workdir")
    assert not (tmp_path / "new_run").exists()


# ----------------------------------------------------------------------------- disk space
Usage = namedtuple("Usage", "total used free")


def test_disk_full_refused_before_anything_is_written(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 10 ** 9, 0))
    workdir = tmp_path / "run"
    _refused(train_cli, _argv(workdir, data_dir), capsys, errors.EXIT_DISK_FULL,
             "disk full:", "has 0 B free", errors.MIN_FREE_ENV)
    assert not workdir.exists()


def test_disk_smaller_than_one_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    """No reserve asked (VLM_JAX_MIN_FREE_MB=0) but 1000 bytes free: less than one checkpoint of the
    tiny train state; refused after the abstract state is built, before the first step and save."""
    monkeypatch.setenv(errors.MIN_FREE_ENV, "0")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 10 ** 9, 1000))
    workdir = tmp_path / "run"
    _refused(train_cli, _argv(workdir, data_dir), capsys, errors.EXIT_DISK_FULL,
             "disk full:", "one checkpoint of the train state", "training did not start")
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
    assert not (workdir / "metrics.jsonl").exists()


def test_disk_full_during_a_save_keeps_the_last_checkpoint(copy_of, data_dir, capsys, monkeypatch):
    """ENOSPC from a save (as Orbax raises it) stops with one message; steps 2 and 4 stay as they were."""
    workdir = copy_of()
    before = {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints/")}

    def full(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, str(step)))

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", full)
    err = _refused(train_cli, _argv(workdir, data_dir, steps=6), capsys, errors.EXIT_DISK_FULL,
                   "disk full: no space left on device while writing", "checkpoints/6",
                   "last complete checkpoint")
    assert "Traceback" not in err
    after = _hashes(workdir)   # (config.json and metrics.jsonl belong to this accepted, resumed run)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == before
    assert ckpt_lib.Checkpointer(workdir, async_save=False).all_steps() == [2, 4]


def _disk_bytes(path) -> int:
    """Bytes a directory takes on tmpfs (whole 4 KiB pages per file)."""
    return sum(-(-os.path.getsize(os.path.join(r, f)) // 4096) * 4096 for r, _, fs in os.walk(path) for f in fs)


def test_real_full_disk_during_an_async_save(trained, data_dir, tmp_path, capsys, monkeypatch):
    """A real ENOSPC (a tmpfs with room for about one and a half checkpoints; needs root's mount):
    the failed async save of step 4 stops the run with the disk-full message (no asyncio /
    TensorStore tracebacks) and step 2, written before, is intact."""
    if os.environ.get("VLM_JAX_TEST_REAL_DISK") != "1":
        # Sizing the tmpfs so that step 2 fits and step 4 does not depends on Orbax's temporary
        # files and the event-file growth; in 3 of 4 runs on the 2-core machine step 2's own save
        # hit ENOSPC already. The simulated case above covers the behaviour in every run.
        pytest.skip("opt-in (VLM_JAX_TEST_REAL_DISK=1): a real tmpfs whose fill order is timing dependent")
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    ckpt = _disk_bytes(os.path.join(trained, "checkpoints", "2"))
    other = _disk_bytes(trained) - _disk_bytes(os.path.join(trained, "checkpoints"))   # config, vocab, logs
    size = 2 * other + int(1.5 * ckpt) + 64 * 1024     # room for the logs of 8 steps + step 2, not step 4 too
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        monkeypatch.setenv(errors.MIN_FREE_ENV, "0")
        workdir = mnt / "run"
        err = _refused(train_cli, _argv(workdir, data_dir, steps=8), capsys, errors.EXIT_DISK_FULL,
                       "disk full: no space left on device", "last complete checkpoint")
        assert "Traceback" not in err and "Event loop is closed" not in err, err
        ck = ckpt_lib.Checkpointer(str(workdir), async_save=False)
        assert ck.all_steps() == [2]
        ck.close()
    finally:
        gc.collect()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_state_bytes_counts_every_leaf():
    import jax
    import numpy as np
    tree = {"a": jax.ShapeDtypeStruct((3, 4), np.float32), "b": [np.zeros((5,), np.int8)]}
    assert errors.state_bytes(tree) == 3 * 4 * 4 + 5


# ----------------------------------------------------------------------------- data files
def test_karpathy_split_file_that_is_not_json(data_dir, tmp_path, capsys):
    manual = tmp_path / "coco"
    manual.mkdir()
    (manual / "dataset_coco.json").write_text('{"images": [ {"filename": "a.jpg", ')   # cut off mid-file
    before = _hashes(manual)
    workdir = tmp_path / "run"
    err = _refused(train_cli, _argv(workdir, str(tmp_path / "tfds"), "--config.data.name=karpathy_captions",
                                    "--config.data.builder_config=coco", f"--config.data.manual_dir={manual}",
                                    "--config.data.num_train=0", "--config.data.num_val=0", "--config.data.num_test=0"),
                   capsys, errors.EXIT_DATA, "data error:", "dataset_coco.json is not valid JSON",
                   "re-download the Karpathy split file")
    assert "Traceback" not in err and _hashes(manual) == before


def test_manual_dir_that_does_not_exist(data_dir, tmp_path, capsys):
    err = _refused(train_cli, _argv(tmp_path / "run", data_dir, "--config.data.name=karpathy_captions",
                                    "--config.data.builder_config=coco",
                                    f"--config.data.manual_dir={tmp_path / 'nowhere'}"),
                   capsys, errors.EXIT_CONFIG, "config error: config.data.manual_dir=", "is not a directory")
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_divergence_stops_with_the_term_and_exit_9(data_dir, tmp_path, capsys):
    """An exploding learning rate under a parameter-norm limit: 'training diverged:' (exit 9) naming
    the step and the norm, before any checkpoint of the diverged state."""
    workdir = tmp_path / "run"
    err = _refused(train_cli, _argv(workdir, data_dir, "--config.optim.lr=50.0", "--config.optim.grad_clip=0",
                                    "--config.train.max_param_norm=1.0", steps=4, every=1),
                   capsys, errors.EXIT_DIVERGED, "training diverged at step 1: parameter norm",
                   "--config.train.on_divergence=skip")
    assert "Traceback" not in err
    assert not [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]


# ----------------------------------------------------------------------------- configs
def test_unknown_config_key(data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    err = _refused(train_cli, _argv(workdir, data_dir, "--config.train.num_stepz=3"), capsys, errors.EXIT_CONFIG,
                   "config error: unknown config key 'train.num_stepz'", "valid keys here")
    assert "Traceback" not in err
    assert not workdir.exists()


def test_config_value_of_the_wrong_type(data_dir, tmp_path, capsys):
    _refused(train_cli, _argv(tmp_path / "run", data_dir, "--config.train.batch_size=many"), capsys,
             errors.EXIT_CONFIG, "config error: config key 'train.batch_size'", "must be an integer")
    assert not (tmp_path / "run").exists()


def test_config_mismatch_on_rerun_changes_nothing(trained, data_dir, capsys):
    """Rerunning a workdir with another model's config is refused; config.json (the run that
    wrote the checkpoints) and every checkpoint file keep their hashes."""
    before = _hashes(trained)
    assert "config.json" in before and any(k.startswith("checkpoints/4/") for k in before)
    err = _refused(train_cli, _argv(trained, data_dir, "--config.model.hidden_dim=48"), capsys,
                   errors.EXIT_CHECKPOINT, "checkpoint error:", "different model", "Use a fresh --workdir")
    assert "Traceback" not in err
    assert _hashes(trained) == before


def test_debug_flag_shows_the_traceback(data_dir, tmp_path, capsys):
    _refused(train_cli, _argv(tmp_path / "run", data_dir, "--config.train.num_stepz=3", "--debug"), capsys,
             errors.EXIT_CONFIG, "Traceback (most recent call last)", "ConfigError", "config error: unknown config key")


def test_debug_env_var_shows_the_traceback(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    _refused(eval_cli, _argv(tmp_path / "empty", data_dir), capsys, errors.EXIT_CHECKPOINT,
             "Traceback (most recent call last)", "CheckpointNotFoundError", "checkpoint error:")


def test_an_unknown_exception_keeps_its_traceback(data_dir, tmp_path, monkeypatch):
    """A bug is not dressed up as a project error: it propagates (Python prints its traceback, exit 1)."""
    def boom(config, workdir, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(train_lib, "train", boom)
    with pytest.raises(KeyError, match="a bug"):
        train_cli.main(_argv(tmp_path / "run", data_dir))


# ----------------------------------------------------------------------------- evaluation
def test_eval_on_an_empty_workdir(data_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _refused(eval_cli, _argv(tmp_path / "empty", data_dir), capsys, errors.EXIT_CHECKPOINT,
                   "checkpoint error:", "holds no checkpoints/", "train first: python train.py")
    assert "Traceback" not in err
    assert not os.listdir(tmp_path / "empty")


def test_eval_step_that_does_not_exist(trained, data_dir, capsys):
    before = _hashes(trained)
    _refused(eval_cli, _argv(trained, data_dir, "--step", "3"), capsys, errors.EXIT_CHECKPOINT,
             "checkpoint error: --step 3: no checkpoint for that step", "available steps: [2, 4]",
             "leave out --step")
    assert _hashes(trained) == before


def test_eval_py_process_on_an_empty_workdir(data_dir, tmp_path):
    """The real process: exit code 6, one message, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
    env.pop(errors.DEBUG_ENV, None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *_argv(tmp_path / "none", data_dir)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == errors.EXIT_CHECKPOINT, r.stdout[-2000:] + r.stderr[-2000:]
    assert "checkpoint error: --workdir" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- checkpoints
def _corrupt_arrays(workdir, step: int) -> None:
    """Random bytes over the middle third of every array file of ``step``."""
    import random
    rnd = random.Random(0)
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if os.sep + "d" + os.sep in path and os.path.getsize(path) > 0:
                n = os.path.getsize(path)
                with open(path, "r+b") as fh:
                    fh.seek(n // 3)
                    fh.write(bytes(rnd.randrange(256) for _ in range(max(1, n // 3))))


def test_walk_back_prints_one_line_per_skipped_step(copy_of, data_dir, caplog, capfd):
    """Random bytes in the latest step: restore walks back to step 2 with exactly one warning
    line for step 4 (step number + a short reason), no asyncio / TensorStore tracebacks."""
    workdir = copy_of()
    _corrupt_arrays(workdir, 4)
    good = {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints/2/")}
    config = sat_config(data_dir, train__num_steps=4, train__checkpoint_every=2)
    task, mesh = train_lib.make_task_and_mesh(config, workdir)
    program = train_lib.build_program(config, task, mesh)
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    with caplog.at_level(logging.INFO):
        restored = train_lib.restore_state(program, ck, config, task, data_state=False)
        ck.close()
        gc.collect()
    assert restored[0] == 2
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("vlm_jax")]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert line.startswith("checkpoint step 4 ") and "trying an earlier step" in line
    assert "\n" not in line and "TensorStore" not in line and len(line) < 200 + len(workdir) + 80, line
    out, err = capfd.readouterr()
    assert "Event loop is closed" not in out + err and "Traceback" not in out + err, (out + err)[-3000:]
    assert {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints/2/")} == good


def test_evaluation_walks_back_without_moving_files(copy_of, data_dir, caplog):
    """eval's restore skips an unreadable latest step and says so, but leaves every file of the
    workdir where it was (training, not evaluation, sets unreadable steps aside)."""
    from vlm_jax import eval_lib
    workdir = copy_of()
    _corrupt_arrays(workdir, 4)
    before = _hashes(workdir)
    config = sat_config(data_dir, train__num_steps=4, train__checkpoint_every=2)
    with caplog.at_level(logging.WARNING):
        _, step, _ = eval_lib.restore(config, workdir)
        gc.collect()
    assert step == 2
    assert any("unreadable steps [4] were left in place" in r.getMessage() for r in caplog.records)
    assert _hashes(workdir) == before
    assert not any(n.endswith(".corrupt") for n in os.listdir(os.path.join(workdir, "checkpoints")))


def test_no_readable_checkpoint(copy_of, data_dir, capsys):
    workdir = copy_of()
    for step in (2, 4):
        _corrupt_arrays(workdir, step)
    before = _hashes(workdir)
    err = _refused(train_cli, _argv(workdir, data_dir), capsys, errors.EXIT_CHECKPOINT,
                   "checkpoint error: no readable checkpoint", "steps [2, 4]", "Move the directory away")
    assert "Traceback" not in err and "See full TensorStore details" not in err
    assert _hashes(workdir) == before


def test_short_reason_is_one_line_with_the_array():
    e = Exception("Encountered error while reading array index: (slice(0, 16, 1),). See full TensorStore "
                  "details: <bound method spec of TensorStore({\n  'kvstore': {'path': '/tmp/x/state/'},\n"
                  "  'path': 'params.init_h.kernel/',\n" + "  'x': 1,\n" * 200 + "})>.")
    text = ckpt_lib.short_reason(e)
    assert "\n" not in text and len(text) <= 200
    assert text.startswith("Exception: Encountered error while reading array index")
    assert text.endswith("(array params.init_h.kernel)")


# ----------------------------------------------------------------------------- preemption
def test_sigterm_exits_75_with_a_resumable_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM (sent to this process after step 1) stops at step 2 with its checkpoint; train.main
    returns 75 (EX_TEMPFAIL, resumable), not 0, and runs no final evaluation."""
    calls = []

    def evaluators(*args, **kwargs):       # called after every step: deliver the signal once
        if not calls:
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return {}

    monkeypatch.setattr(train_lib, "run_evaluators", evaluators)
    monkeypatch.setattr(train_lib, "final_evaluation", lambda *a, **k: pytest.fail("evaluated a stopped run"))
    workdir = tmp_path / "run"
    code = train_cli.main(_argv(workdir, data_dir, steps=6, every=100))
    err = capsys.readouterr().err
    assert code == errors.EXIT_PREEMPTED == 75, err
    assert "stopped early at step 2 of 6 (SIGTERM)" in err and "Rerun the same command to resume" in err
    assert ckpt_lib.Checkpointer(str(workdir), async_save=False).all_steps() == [2]


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("exc, code, prefix", [
    (OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/6"), errors.EXIT_DISK_FULL, "disk full:"),
    (RuntimeError("TensorStore write failed: No space left on device [source locations...]"),
     errors.EXIT_DISK_FULL, "disk full:"),
    (PermissionError(errno.EACCES, "Permission denied", "/w/metrics.jsonl"), errors.EXIT_UNWRITABLE,
     "permission denied: cannot write /w/metrics.jsonl"),
    (OSError(errno.EROFS, "Read-only file system", "/w/config.json"), errors.EXIT_UNWRITABLE,
     "read-only file system: cannot write /w/config.json"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/w/x"), errors.EXIT_UNWRITABLE, "not a directory: /w/x"),
    (FileExistsError(errno.EEXIST, "File exists", "/w"), errors.EXIT_UNWRITABLE, "not a directory: /w"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.json"), errors.EXIT_DATA,
     "not found: /data/x.json"),
    (FloatingPointError("loss is nan at step 7"), errors.EXIT_DIVERGED, "training diverged: loss is nan"),
    (errors.DataError("captions.json: not JSON"), errors.EXIT_DATA, "data error: captions.json"),
])
def test_classification_of_io_and_other_errors(exc, code, prefix):
    got = errors.classify(exc)
    assert got is not None and got[0] == code and got[1].startswith(prefix), got


def test_classification_of_every_project_error_class():
    """Every project exception class (grep 'class .*Error') maps to its category."""
    from vlm_jax import config_lib, init_sources
    from vlm_jax.convert.common import ConversionError
    from vlm_jax.data.pretrained_tokenizer import TokenizerError
    cases = [(config_lib.ConfigError("k"), errors.EXIT_CONFIG, "config error: k"),
             (init_sources.InitSourceError("k"), errors.EXIT_WEIGHTS, "init error: k"),
             (ConversionError("k"), errors.EXIT_WEIGHTS, "weights error: k"),
             (TokenizerError("k"), errors.EXIT_DATA, "tokenizer error: k"),
             (ckpt_lib.CheckpointMismatchError("k"), errors.EXIT_CHECKPOINT, "checkpoint error: k"),
             (ckpt_lib.CheckpointNotFoundError("k"), errors.EXIT_CHECKPOINT, "checkpoint error: k"),
             (ckpt_lib.CheckpointError("k"), errors.EXIT_CHECKPOINT, "checkpoint error: k"),
             (errors.WorkdirError("workdir error: k"), errors.EXIT_UNWRITABLE, "workdir error: k"),
             (errors.DiskFullError("disk full: k"), errors.EXIT_DISK_FULL, "disk full: k")]
    for exc, code, message in cases:
        assert errors.classify(exc) == (code, message), exc
    for bug in (ValueError("x"), KeyError("x"), RuntimeError("x"), TypeError("x")):
        assert errors.classify(bug) is None
