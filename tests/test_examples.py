"""The README's main job runs and prints the comparison it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import write_fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def run_example(folder: Path, script: str, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``examples/<script>`` in ``folder`` on the fake Fashion-MNIST written there."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *arguments],
        cwd=folder, env={**os.environ, "FASHION_MNIST_DIR": str(folder), "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=timeout)


def test_main_job_compares_plain_and_repaired_fits(tmp_path):
    write_fake_fashion_mnist(tmp_path, train=10_300, test=100)
    result = run_example(tmp_path, "fashion_mnist_repair.py", "--epochs", "2", "--train-subset", "300")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Test accuracy, plain training:" in out and "Test accuracy, with RepairCallback():" in out
    assert "points)" in out and ("Removed" in out)
    assert "round  epoch  failures" in out  # the rounds table: one round, after the second epoch


def test_resnet_example_repairs_torchvisions_resnet18_as_written(tmp_path):
    write_fake_fashion_mnist(tmp_path, train=200, test=40)
    result = run_example(tmp_path, "resnet_repair.py", "--epochs", "3", "--train-subset", "100", "--val-size", "100",
                         timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Curvature backend: none needed" in result.stdout  # the defaults; test_any_model covers the Fisher
    assert "Test accuracy, with RepairCallback():" in result.stdout


def test_repair_once_example_repairs_a_model_trained_without_fit(tmp_path):
    write_fake_fashion_mnist(tmp_path, train=600, test=60)
    result = run_example(tmp_path, "repair_once.py", "--epochs", "1", "--train-subset", "300", "--val-size", "300")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "round  epoch  failures" in result.stdout
    assert "Test accuracy after one RepairRound:" in result.stdout and "training examples;" in result.stdout
