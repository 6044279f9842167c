"""RepairCallback under DDP with two CPU processes (gloo): the same repair on every rank, work shared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "ddp_blobs.py"


def test_ddp_two_processes_repair_alike_and_share_the_scoring(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]

    # The failure set is V's, gathered from both ranks' shares; every decision is the same on both ranks.
    assert ranks[0]["rounds"] == ranks[1]["rounds"] and len(ranks[0]["rounds"]) == 3
    assert all(r["failures"] == r["query"] + r["holdout"] > 0 for r in ranks[0]["rounds"])
    assert ranks[0]["removed"] == ranks[1]["removed"] and len(ranks[0]["removed"]) == 36
    # The treatment ends with identical weights on every rank.
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    # Scoring is sharded: each rank scores half of the kept examples (400, then 388, then 376).
    for rank in ranks:
        assert rank["scored"] == [200, 194, 188]
    # Every rank's DistributedSampler excludes the causes from the next epoch on.
    assert ranks[0]["sampler"] == ranks[1]["sampler"] == ["ExcludingSampler", "DistributedSampler"]
    for rank in ranks:
        for epoch, served in rank["served"].items():
            excluded = set(rank["excluded"][epoch])
            assert len(excluded) == 12 * int(epoch) and not set(served) & excluded
        assert len(rank["served"]["2"]) == 200  # epochs keep their length on every rank
