"""Multi-host preemption: SIGTERM reaches ONE of two processes; both must stop at the same step.

Two processes on 127.0.0.1 (jax.distributed, 2 CPU devices each, a 4-device global mesh) train
the tiny SAT config "forever" (num_steps 1e6, no log boundary and no periodic checkpoint before
step 1e6). Once process 1 has trained a few steps, it alone gets SIGTERM. The trainer's per-step
agreement (`train_lib.PreemptionAgreement`: an all-reduce of the local flags launched every step,
read one step later) must stop process 0 too, at the same step, with one checkpoint written
together; both exit 0. Rerunning the same two-process job then resumes from that checkpoint.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import FAST_COMPILE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAT = os.path.join(ROOT, "configs", "sat.py")
NUM_STEPS = 1_000_000      # far more than the run can reach: only the signal stops it

WORKER = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from vlm_jax import config_lib, train_lib
    config = config_lib.load_config(sys.argv[3] + ":tiny", {
        "data.data_dir": sys.argv[4], "train.num_steps": sys.argv[6],
        "train.log_every": sys.argv[7], "train.checkpoint_every": str(10 ** 6)})
    result = train_lib.train(config, sys.argv[5])
    print("RESULT", json.dumps({"process": jax.process_index(), "step": result.step,
                                "stopped_early": result.stopped_early}), flush=True)
""")

# grain's refusal when a process restores another process's data-iterator state (see _resume).


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Worker:
    """One training process; a thread drains its stdout (a full pipe would block it) and records
    the last step it logged ("step N/<num_steps> eta ..." at every log boundary)."""

    def __init__(self, script, addr, index, data_dir, workdir, num_steps, env, log_every):
        self.proc = subprocess.Popen([sys.executable, str(script), addr, str(index), SAT, data_dir, workdir,
                                      str(num_steps), str(log_every)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines, self.last_step, self.started = [], 0, None
        self._lock = threading.Lock()
        self._pattern = re.compile(rf"\bstep (\d+)/{num_steps} eta")
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self):
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)
                m = self._pattern.search(line)
                if m:
                    self.last_step = int(m.group(1))
                if "first step (incl. compilation)" in line and self.started is None:
                    self.started = time.time()

    def text(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def result(self) -> dict | None:
        for line in self.text().splitlines():
            if line.startswith("RESULT"):
                return json.loads(line.split("RESULT", 1)[1])
        return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _launch(script, data_dir, workdir, num_steps, env, log_every=1) -> list[_Worker]:
    addr = f"127.0.0.1:{_free_port()}"
    return [_Worker(script, addr, i, data_dir, workdir, num_steps, env, log_every) for i in range(2)]


def _logs(workers) -> str:
    return "\n".join(f"--- process {i} ---\n{w.text()[-3000:]}" for i, w in enumerate(workers))


def _wait_all(workers, timeout: float) -> None:
    """Wait for every worker to exit. Once one fails (a traceback, or a nonzero exit), the other would
    only hang in a collective until gloo's 30 s deadline, and the failed one with it at the
    jax.distributed shutdown barrier: stop both after a short grace period instead."""
    deadline = time.time() + timeout
    failed_at = None
    while any(w.proc.poll() is None for w in workers):
        if time.time() > deadline:
            pytest.fail(f"workers still running after {timeout:.0f} s:\n{_logs(workers)}")
        if failed_at is None and any(w.proc.poll() not in (None, 0) or "Traceback (most recent call last)" in w.text()
                                     for w in workers):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > 3:
            for w in workers:
                w.kill()
        time.sleep(0.05)
    for w in workers:
        w._thread.join(timeout=10)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    from vlm_jax import checkpoint as ckpt_lib
    from vlm_jax import config_lib
    from vlm_jax.data import pipeline

    # The dataset is built here, once (~0.1 s), before the workers start: they only read it.
    data_dir = str(tmp_path / "tfds")
    pipeline.get_dataset(config_lib.load_config(f"{SAT}:tiny", {"data.data_dir": data_dir}).data)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=FAST_COMPILE, PYTHONUNBUFFERED="1")
    workdir = str(tmp_path / "run")

    workers = []
    try:
        # log_every = NUM_STEPS: no log boundary before the end, so only a per-step agreement can stop them
        workers = _launch(script, data_dir, workdir, NUM_STEPS, env, log_every=NUM_STEPS)
        # Only process 1 is watched and signalled; process 0 can learn of it only through the agreement.
        deadline = time.time() + 400
        while workers[1].started is None or time.time() < workers[1].started + 2.0:   # a few steps past step 1
            assert time.time() < deadline, f"process 1 finished no first step in 400 s:\n{_logs(workers)}"
            assert all(w.proc.poll() is None for w in workers), f"a worker exited before the signal:\n{_logs(workers)}"
            time.sleep(0.02)
        workers[1].proc.send_signal(signal.SIGTERM)
        _wait_all(workers, timeout=300)
    finally:
        for w in workers:
            w.kill()

    for i, w in enumerate(workers):
        assert w.proc.returncode == 0, f"process {i} exited with {w.proc.returncode}:\n{_logs(workers)}"
    results = [w.result() for w in workers]
    assert all(results) and [r["process"] for r in results] == [0, 1], _logs(workers)
    saved = results[1]["step"]
    assert results[0]["step"] == saved, results
    assert results[0]["stopped_early"] and results[1]["stopped_early"], results
    assert 1 <= saved < NUM_STEPS, saved          # between log boundaries
    # Only process 1 received the signal; both stopped because of it, at the same step.
    outs = [w.text() for w in workers]
    assert "SIGTERM received" in outs[1] and "SIGTERM received" not in outs[0], _logs(workers)
    for out in outs:
        assert f"stopped at step {saved} after SIGTERM" in out, out[-3000:]

    # Exactly one checkpoint: the preemption save, at the agreed step.
    ck = ckpt_lib.Checkpointer(workdir)
    assert ck.all_steps() == [saved]
    ck.close()

    _resume(script, data_dir, workdir, saved, env)
    ck = ckpt_lib.Checkpointer(workdir)
    assert ck.all_steps() == [saved, saved + 2]
    ck.close()


def _resume(script, data_dir, workdir, saved: int, env) -> None:
    """Rerun the same two-process job for two more steps: both processes restore step `saved`."""
    workers = []
    try:
        workers = _launch(script, data_dir, workdir, saved + 2, env)
        _wait_all(workers, timeout=400)
    finally:
        for w in workers:
            w.kill()
    for i, w in enumerate(workers):
        assert w.proc.returncode == 0, f"resumed process {i} exited with {w.proc.returncode}:\n{_logs(workers)}"
        out = w.text()
        assert f"resumed from step {saved} " in out, out[-3000:]
        assert "initialised" not in out, "the resumed run must not initialise fresh parameters"
        r = w.result()
        assert r is not None and r["step"] == saved + 2 and not r["stopped_early"], (r, out[-3000:])
