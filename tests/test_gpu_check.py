"""scripts/gpu_check.sh refuses clearly, and writes no report, where there is no GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run the full check")
def test_gpu_check_without_a_gpu_exits_with_a_clear_message(tmp_path):
    report = tmp_path / "gpu-check.md"
    proc = subprocess.run(["bash", str(SCRIPT), str(report)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "no CUDA device visible to torch" in proc.stderr and "NVIDIA GPU" in proc.stderr
    assert not report.exists() and list(tmp_path.iterdir()) == []
