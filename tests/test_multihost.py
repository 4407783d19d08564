"""Two processes on 127.0.0.1 with jax.distributed train the tiny SAT config through the one trainer.

Each process owns 2 CPU devices (a 4-device global mesh), reads its own half of every global
batch, and both write one Orbax checkpoint together. Process 0 builds the dataset while process 1
waits at the pipeline's barrier. The parameters after training must be
identical on both processes, and a single-process restore of that checkpoint must see them.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import FAST_COMPILE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from vlm_jax import config_lib, train_lib
    config = config_lib.load_config(sys.argv[3] + ":tiny", {"data.data_dir": sys.argv[4], "train.num_steps": "2",
                                                          "train.checkpoint_every": "2"})
    result = train_lib.train(config, sys.argv[5])
    metrics = train_lib.run_evaluators(result.task, result.state, workdir=sys.argv[5], step=result.step,
                                       final=True).get("caption", {})
    from jax.experimental import multihost_utils
    leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(result.state.params)]
    print("RESULT", json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                                "local": jax.local_device_count(), "step": result.step,
                                "checksum": float(sum(np.abs(l).sum() for l in leaves)),
                                "num_images": metrics.get("num_images")}), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training(tmp_path):
    # The dataset is not prepared beforehand: process 0 builds it while process 1 waits at the
    # pipeline's barrier, as on a fresh multi-host job with a shared data_dir.
    data_dir = str(tmp_path / "tfds")

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    addr = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=FAST_COMPILE)
    workdir = str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, str(script), addr, str(i), os.path.join(ROOT, "configs", "sat.py"),
                               data_dir, workdir], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    results = [json.loads(line.split("RESULT", 1)[1]) for out in outs for line in out.splitlines()
               if line.startswith("RESULT")]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["devices"] == 4 and r["local"] == 2 and r["step"] == 2 for r in results)
    assert results[0]["checksum"] == results[1]["checksum"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))

    # Evaluation across the two processes: every test image captioned exactly once, each caption
    # under its own image id -- the same captions a single process (8 devices) gives for the
    # restored checkpoint.
    by_process = {r["process"]: r for r in results}
    assert by_process[0]["num_images"] == 16 and by_process[1]["num_images"] is None
    multi = {r["image_id"]: r["caption"] for r in json.load(open(os.path.join(workdir, "eval", "step_2", "results.json")))}
    assert len(multi) == 16
    from vlm_jax import config_lib, eval_lib
    single_dir = str(tmp_path / "single")
    import shutil
    shutil.copytree(workdir, single_dir)
    shutil.rmtree(os.path.join(single_dir, "eval"))
    config = config_lib.load_config(os.path.join(ROOT, "configs", "sat.py") + ":tiny",
                                    {"data.data_dir": data_dir, "train.num_steps": "2"})
    eval_lib.evaluate(config, single_dir)
    single = {r["image_id"]: r["caption"] for r in json.load(open(os.path.join(single_dir, "eval", "step_2", "results.json")))}
    assert single == multi
