"""Resume exactly after a crash: a real process killed with SIGKILL, then resumed from the last checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_blobs.py"


def train(root: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root), *flags], capture_output=True, text=True,
                          timeout=300)


def checkpointed_state(root: Path) -> tuple[dict, dict]:
    checkpoint = torch.load(root / "last.ckpt", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("RepairCallback"))
    return checkpoint, state


@pytest.mark.parametrize("kill", [["--kill-at-step", "25"], ["--kill-in-round", "3"]],
                         ids=["mid_epoch", "during_round"])
def test_training_resumes_exactly_after_sigkill(tmp_path, kill):
    crashed = train(tmp_path, *kill)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    checkpoint, state = checkpointed_state(tmp_path)
    assert len(state["rounds"]) == 2 and len(state["removed_indices"]) == 20

    resumed = train(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads((tmp_path / "resumed.json").read_text())

    # The removed set, the round history and the sampler's exclusion are exactly as checkpointed.
    assert result["at_start"]["removed"] == state["removed_indices"]
    assert result["at_start"]["rounds"] == len(state["rounds"])
    assert result["rounds"][:2] == json.loads(json.dumps(state["rounds"]))
    assert result["at_start"]["step"] == checkpoint["global_step"]
    removed_before = set(state["removed_indices"])
    for epoch, served in result["served"].items():
        assert not set(served) & removed_before, f"epoch {epoch} served a removed example"
    # Training goes on and later rounds run. A kill inside round 3 loses that round: the last checkpoint was
    # written before it, and Lightning does not rerun an interrupted end-of-epoch validation when resuming.
    epochs = [r["epoch"] for r in result["rounds"]]
    assert epochs == ([0, 1, 2, 3] if kill[0] == "--kill-at-step" else [0, 1, 3])
    assert len(result["removed"]) == 10 * len(epochs) and set(result["removed"]) >= removed_before
