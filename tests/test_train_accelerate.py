"""The training command under ``accelerate launch`` with two CPU processes (torchrun + gloo)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage2_runs_in_two_processes(repo, tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed")
    out = tmp_path / "s2"
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "analysis.py", "train", "--stage", "2", "--model", "tiny-qwen2.5-vl", "--preset", "small",
        "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "train.json").read_text())
    assert record["world_size"] == 2 and record["global_batch"] == 4 and record["steps"] == 2
    assert record["device"].startswith("cpu")
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint").exists()
