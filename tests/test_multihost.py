"""Multi-host training: two processes on localhost (JAX's distributed runtime, gloo CPU
collectives), 2 CPU devices each, train sharded steps over a 4-device mesh, save, stop,
resume from the checkpoint, and match a single-process run on 4 devices step for step."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest model and loss (the multi-host mechanics do not depend on them; the U-Net's
# sharding is tested in test_sharding.py): one compile is seconds, not minutes.
OVERRIDES = [
    "--config.loss.ssim=0",
    "--config.data.source=render",
    "--config.geometry.resolution=16",
    "--config.data.pool_size=2",
    "--config.data.batch_size=4",
    "--config.mesh.data=4",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(workdir, steps: int, processes: int, devices_per_process: int):
    cmd = [
        sys.executable,
        "-m",
        "xct.main",
        "--config=configs/baseline64.py:smoke",
        f"--workdir={workdir}",
        f"--config.train.num_steps={steps}",
        *OVERRIDES,
    ]
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    if processes > 1:
        env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{_free_port()}"
        env["JAX_NUM_PROCESSES"] = str(processes)
    procs, logs = [], []
    for pid in range(processes):
        if processes > 1:
            env = {**env, "JAX_PROCESS_ID": str(pid)}
        # Output to files, not pipes: a process blocked on a full pipe would never reach
        # the distributed runtime's shutdown barrier.
        logs.append(pathlib.Path(f"{workdir}.{steps}.{pid}.log"))
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    for p in procs:
        p.wait(timeout=900)
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def _losses(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow  # about 220 s on 2 cores; exact resume in one process: tests/test_train.py
def test_two_processes_train_save_resume_and_match_one_process(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    outs = _run(multi, steps=2, processes=2, devices_per_process=2)
    assert "step      2/2" in outs[0] and "step      2/2" not in outs[1]  # process 0 logs
    assert (multi / "checkpoints" / "2").is_dir()
    outs = _run(multi, steps=4, processes=2, devices_per_process=2)  # resumes at step 2
    assert "resumed from" in outs[0] and "resumed from" in outs[1]
    # The same schedule on one process (the learning-rate schedule follows num_steps).
    _run(single, steps=2, processes=1, devices_per_process=4)
    _run(single, steps=4, processes=1, devices_per_process=4)
    got, ref = _losses(multi), _losses(single)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got, ref)
