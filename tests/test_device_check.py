"""benchmarks/device_check.sh keeps working on any machine: its --quick mode end to end (CUDA tests skip on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_device_check_quick_writes_the_reports_and_the_log(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEEPLAB_CACHE=str(tmp_path / "cache"))
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for batch in (1, 8):
        report = json.loads((tmp_path / f"benchmark_{device}_bs{batch}.json").read_text())
        assert report["environment"]["device"].startswith(device) and report["environment"]["batch_size"] == batch
        assert report["fps"]["end_to_end"] > 0 and report["variants"] and report["crf_compare"]["backends"]
    log = (tmp_path / "device_check.log").read_text()
    assert "== CUDA-marked tests" in log and "== summary" in log and f"({device}), batch 8" in log


def test_device_check_refuses_unknown_arguments() -> None:
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--full"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr
