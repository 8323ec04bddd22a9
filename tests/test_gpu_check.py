"""`make gpu-check` without CUDA: one line, exit 0, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.strip().startswith("gpu-check: no CUDA device is visible")
    assert len(proc.stdout.strip().splitlines()) == 1
    assert not out.exists()
