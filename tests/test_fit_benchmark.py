"""The end-to-end benchmark's own parts: the small-loss schedule and the paired summaries."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.fit import small_loss_keep
from benchmarks.fit_report import summarize_setting


@pytest.mark.parametrize("epoch, kept", [(0, 96), (4, 80), (9, 60), (30, 60)])
def test_small_loss_drops_a_growing_share_of_the_highest_losses(epoch, kept):
    losses = torch.arange(100, dtype=torch.float).flip(0)  # example i has loss 99 - i
    keep = small_loss_keep(losses, forget_rate=0.4, epoch=epoch, warmup_epochs=10)
    assert len(keep) == kept
    assert set(keep.tolist()) == set(range(100 - kept, 100))  # the smallest losses


def test_small_loss_keeps_at_least_one_example():
    assert len(small_loss_keep(torch.ones(2), forget_rate=1.0, epoch=20)) == 1


def _record(run: str, seed: int, test: float, seconds: float, **extra) -> dict:
    return {"setting": {"protocol": "pairs", "regime": "3k-mem", "seed": seed}, "run": run, "test": test,
            "seconds": seconds, "peak_memory_mb": 100.0, "validation_accuracy": [0.5, 0.6], **extra}


def test_summaries_pair_each_run_with_plain_training_of_the_same_seed():
    runs = {"plain": {0: _record("plain", 0, 0.70, 10.0), 1: _record("plain", 1, 0.80, 20.0)},
            "oracle": {0: _record("oracle", 0, 0.90, 10.0), 1: _record("oracle", 1, 0.90, 20.0)},
            "repair": {0: _record("repair", 0, 0.80, 15.0, precision=0.5, recall=0.25),
                       1: _record("repair", 1, 0.79, 20.0, precision=1.0, recall=0.75)}}
    summary = summarize_setting(runs)["repair"]
    assert summary["change_from_plain"]["mean"] == pytest.approx((0.10 - 0.01) / 2)
    assert summary["gap_closed"]["mean"] == pytest.approx((0.5 - 0.1) / 2)
    assert summary["time_over_plain"]["mean"] == pytest.approx((1.5 + 1.0) / 2)
    assert summary["better_than_plain"] == 1 and summary["paired"] == 2
    assert summary["precision"]["mean"] == pytest.approx(0.75)
    assert math.isnan(summarize_setting(runs)["plain"]["precision"]["mean"])


def test_pairs_whose_plain_fit_ran_on_another_machine_are_named(tmp_path):
    from benchmarks.fit_report import cross_machine_pairs, write_fit_results

    def on(device: str, record: dict) -> dict:
        return {**record, "environment": {"cuda": None, "cpu": device}}

    runs = {"plain": {0: on("gpu box", _record("plain", 0, 0.70, 10.0)),
                      1: on("cpu box", _record("plain", 1, 0.80, 9.0))},
            "repair": {0: on("cpu box", _record("repair", 0, 0.80, 15.0)),
                       1: on("cpu box", _record("repair", 1, 0.80, 9.0))},
            "oracle": {0: _record("oracle", 0, 0.90, 10.0)}}  # says nothing of its machine: not flagged
    assert cross_machine_pairs(runs) == {"repair": [0]}
    write_fit_results([record for by_seed in runs.values() for record in by_seed.values()], tmp_path)
    assert "Paired across machines" in (tmp_path / "fit.md").read_text()
    assert "RepairCallback() defaults seed 0." in (tmp_path / "fit.md").read_text()


def test_a_run_that_matches_plain_training_up_to_its_first_round_computed_alike():
    from benchmarks.fit_report import cross_machine_pairs

    def on(platform: str, record: dict) -> dict:
        return {**record, "environment": {"cuda": None, "cpu": "AMD EPYC", "platform": platform}}

    plain = on("Linux-6.18.44-fc-v509", _record("plain", 0, 0.70, 10.0, validation_accuracy=[0.5, 0.6, 0.7]))
    alike = _record("repair", 0, 0.80, 15.0, validation_accuracy=[0.5, 0.6, 0.8], rounds=[{"epoch": 1}])
    departs = _record("repair", 0, 0.80, 15.0, validation_accuracy=[0.5, 0.61, 0.8], rounds=[{"epoch": 1}])
    no_rounds = _record("small_loss", 0, 0.80, 15.0, validation_accuracy=[0.5, 0.6, 0.8])
    assert cross_machine_pairs({"plain": {0: plain}, "repair": {0: on("Linux-6.18.44-fc-v1300", alike)}}) == {}
    assert cross_machine_pairs({"plain": {0: plain}, "repair": {0: on("Linux-6.18.44-fc-v1300", departs)},
                                "small_loss": {0: on("Linux-6.18.44-fc-v1300", no_rounds)}}) == \
        {"repair": [0], "small_loss": [0]}


def test_one_oracle_run_serves_both_protocols_and_says_so(tmp_path):
    import json

    from benchmarks.fit import Setting, cache_path, cached, collect

    pairs, symmetric = Setting("pairs", "3k-mem", 1, 150), Setting("symmetric", "3k-mem", 1, 150)
    cache_path(pairs, "oracle", tmp_path).write_text(json.dumps(_record("oracle", 1, 0.85, 10.0)))
    cache_path(pairs, "plain", tmp_path).write_text(json.dumps(_record("plain", 1, 0.70, 10.0)))
    assert cached(symmetric, "oracle", tmp_path) == cache_path(pairs, "oracle", tmp_path)
    assert cached(symmetric, "plain", tmp_path) is None  # noisy-label runs depend on the protocol
    records = collect([symmetric], ["plain", "oracle"], tmp_path)
    assert [(r["run"], r["setting"]["protocol"], r.get("shared_from")) for r in records] == [
        ("oracle", "symmetric", "pairs")]


@pytest.fixture
def tiny_regime(tmp_path, monkeypatch):
    from helpers import write_fake_fashion_mnist

    from benchmarks import fit

    write_fake_fashion_mnist(tmp_path, train=500, test=60)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(fit, "REGIMES", {"tiny": fit.FitRegime("tiny", 240, 2)})
    monkeypatch.setattr(fit, "VAL_SIZE", 200)
    return fit


@pytest.mark.parametrize("run", ["plain", "oracle", "repair", "cleanlab", "small_loss", "oracle_removal",
                                 "repair_flip_oracle"])
def test_each_run_is_one_fit_with_its_figures(tiny_regime, run):
    record = tiny_regime.run_one(tiny_regime.Setting("pairs", "tiny", 0, 3), run, threads=1)
    assert 0.0 <= record["test"] <= 1.0
    assert len(record["validation_accuracy"]) == 3 and record["seconds"] > 0 and record["peak_memory_mb"] > 0
    assert record["n_train"] == 240 and record["n_flipped"] > 0
    if run in ("plain", "oracle"):
        assert "removed" not in record
    else:
        assert record["removed"] >= 0 and ("precision" in record and "recall" in record)
    if run == "small_loss":
        assert record["removed"] > 0 and 0 < record["forget_rate"] < 1
    if run == "repair":
        # The default schedule: after 2 epochs, leaving the last to train without the causes (Exclude).
        assert [r["epoch"] for r in record["rounds"]] == [1]
    if run == "oracle_removal":
        assert record["removed"] == record["n_flipped"] and record["precision"] == record["recall"] == 1.0
    if run == "repair_flip_oracle":  # a perfect detector: every round's causes are exactly the flips
        [only] = record["rounds"]
        assert only["precision"] == 1.0 and only["causes"] == record["n_flipped"]


def test_oracle_removal_trains_on_exactly_the_unflipped_examples(tiny_regime, monkeypatch):
    trained_on = []
    fit = tiny_regime._fit

    def recording_fit(setting, data, model, callbacks, root, validate=True):
        trained_on.append(sorted(data.train_dataloader().dataset.indices))  # a Subset of the noisy training set
        return fit(setting, data, model, callbacks, root, validate)

    monkeypatch.setattr(tiny_regime, "_fit", recording_fit)
    setting = tiny_regime.Setting("pairs", "tiny", 0, 2)
    record = tiny_regime.run_one(setting, "oracle_removal", threads=1)
    flipped = set(tiny_regime._datamodule(setting, "pairs").flipped_indices.tolist())
    assert trained_on == [sorted(set(range(record["n_train"])) - flipped)]


def test_plain_runs_of_a_setting_start_from_the_same_weights(tiny_regime):
    setting = tiny_regime.Setting("pairs", "tiny", 0, 2)
    first, second = (tiny_regime.run_one(setting, "plain", threads=1) for _ in range(2))
    assert first["validation_accuracy"] == second["validation_accuracy"] and first["test"] == second["test"]


def test_quick_mode_runs_end_to_end_and_reports(tmp_path, monkeypatch):
    # `--quick` as a user runs it (pairs, 3k-mem, seed 0: plain and the defaults), each run in its own process, on a
    # fake Fashion-MNIST and 2 epochs instead of 150.
    from helpers import write_fake_fashion_mnist

    from benchmarks import fit

    data = tmp_path / "data"
    data.mkdir()
    write_fake_fashion_mnist(data, train=13_100, test=100)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(data))
    fit.main(["--quick", "--epochs", "3k-mem=2", "--out", str(tmp_path / "results"), "--cache", str(tmp_path / "c")])
    report = (tmp_path / "results" / "fit.md").read_text()
    assert "`pairs`, `3k-mem` (seeds 0)" in report
    assert "| plain training |" in report and "| RepairCallback() defaults |" in report
    assert (tmp_path / "results" / "fit_pairs_3k-mem.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "pairs_3k-mem_epochs2_seed0_plain.json", "pairs_3k-mem_epochs2_seed0_repair.json"]


def test_quick_mode_runs_its_two_fits_side_by_side_unless_told_otherwise():
    from benchmarks import fit

    assert fit.parse_arguments(["--quick"]).jobs == 2
    assert fit.parse_arguments(["--quick", "--jobs", "1"]).jobs == 1
    assert fit.parse_arguments([]).jobs == 1


def test_a_run_pairs_with_the_plain_fit_of_its_own_machine_where_one_ran(tmp_path):
    import json

    from benchmarks.fit import OTHER_MACHINES, Setting, cache_path, collect
    from benchmarks.fit_report import cross_machine_pairs, group

    def on(platform: str, record: dict) -> dict:
        return {**record, "environment": {"cuda": None, "cpu": "AMD EPYC", "platform": platform}}

    setting = Setting("pairs", "3k-mem", 0, 150)
    cache_path(setting, "plain", tmp_path).write_text(json.dumps(on("new", _record("plain", 0, 0.70, 10.0))))
    cache_path(setting, "repair", tmp_path).write_text(json.dumps(on("new", _record("repair", 0, 0.80, 12.0))))
    cache_path(setting, "cleanlab", tmp_path).write_text(json.dumps(on("old", _record("cleanlab", 0, 0.78, 40.0))))
    cache_path(setting, "small_loss", tmp_path).write_text(json.dumps(on("gpu?", _record("small_loss", 0, 0.75, 9.0))))
    (tmp_path / OTHER_MACHINES).mkdir()
    cache_path(setting, "plain", tmp_path / OTHER_MACHINES).write_text(
        json.dumps(on("old", _record("plain", 0, 0.74, 20.0))))
    runs = group(collect([setting], ["plain", "repair", "cleanlab", "small_loss"], tmp_path))["pairs", "3k-mem"]
    summary = summarize_setting(runs)
    assert "paired_plain" not in runs["repair"][0]
    assert summary["repair"]["change_from_plain"]["mean"] == pytest.approx(0.10)
    # cleanlab ran on the old machine: it pairs with the old machine's plain fit, and is not flagged as crossing.
    assert summary["cleanlab"]["change_from_plain"]["mean"] == pytest.approx(0.04)
    assert summary["cleanlab"]["time_over_plain"]["mean"] == pytest.approx(2.0)
    # No plain fit of small-loss's machine: it pairs with the table's, and is named as crossing machines.
    assert summary["small_loss"]["change_from_plain"]["mean"] == pytest.approx(0.05)
    assert cross_machine_pairs(runs) == {"small_loss": [0]}


def test_the_knn_rule_probe_counts_each_rules_causes_against_the_flips_still_in_training():
    from benchmarks.knn_rule_probe import report, rule_figures

    # Values −scores: mean value 0.1, so m = 1 takes value < −0.1 and m = 0 every negative value.
    scores = torch.tensor([0.5, 0.3, 0.05, -0.2, -0.3, -0.25, -0.4, -0.5])
    indices = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    flipped = torch.tensor([10, 12, 13, 99])  # 99: removed by an earlier round, not in training
    assert scores.mean() == pytest.approx(-0.1)
    plain = rule_figures(scores, indices, flipped, margin=0.0)
    assert plain == {"causes": 3, "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                     "flips_in_training": 3}
    strict = rule_figures(scores, indices, flipped, margin=1.0)
    assert strict == {"causes": 2, "precision": 0.5, "recall": pytest.approx(1 / 3), "flips_in_training": 3}
    lines = [{"protocol": "pairs", "seed": 1, "round": 1, "harm_margin": margin, **figures}
             for margin, figures in ((1.0, strict), (0.0, plain))]
    table = report(lines).splitlines()
    assert len(table) == 4 and "value < 0 | 3 | 0.667 | 0.667" in table[2]
    assert "value < −1 × mean | 2 | 0.500" in table[3]  # sorted by rule


def test_the_trusted_vote_is_the_share_of_the_nearest_utility_points_with_another_label():
    from benchmarks.knn_k_probe import trusted_vote

    generator = torch.Generator().manual_seed(0)
    train_x, utility_x = torch.randn(37, 3, generator=generator), torch.randn(11, 3, generator=generator)
    train_y, utility_y = torch.randint(0, 3, (37,), generator=generator), torch.randint(0, 3, (11,), generator=generator)
    expected = []
    for x, y in zip(train_x, train_y):  # brute force, one training example at a time
        nearest = sorted(range(len(utility_x)), key=lambda j: float((utility_x[j] - x).norm()))[:4]
        expected.append(sum(int(utility_y[j] != y) for j in nearest) / 4)
    assert trusted_vote(train_x, train_y, utility_x, utility_y, k=4, chunk=5).tolist() == pytest.approx(expected)


def test_the_trusted_vote_candidate_runs_as_a_rounds_scorer_with_its_own_rule():
    import lightning.pytorch as pl

    from benchmarks.knn_k_probe import TrustedVote
    from helpers import BlobsDataModule, TinyClassifier
    from lightning_repair.round import RepairRound
    from lightning_repair.treat import Exclude

    torch.manual_seed(0)
    model, data = TinyClassifier(), BlobsDataModule()
    pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False).fit(model, data)
    outcome = RepairRound(scorer=TrustedVote(k=4, disagreement=0.7), treatment=Exclude()).run(
        model, data.train_dataloader(), data.val_dataloader(), flipped=data.flipped_indices)
    scores = outcome.scores
    assert set((scores * 4).round().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}  # shares of 4 neighbours
    assert sorted(outcome.causes.tolist()) == torch.nonzero(scores > 0.7).flatten().tolist()
    assert outcome.record.threshold == 0.7 and outcome.record.causes > 0


def test_the_ranking_probe_scores_each_rule_against_the_flips():
    from benchmarks.knn_k_probe import ap_summary, rule_lines

    # −scores are KNN-Shapley values with mean 0.1: m = 1 takes value < −0.1, m = 0 every negative value.
    scores = torch.tensor([0.5, 0.3, 0.05, -0.2, -0.3, -0.25, -0.4, -0.5])
    is_flip = torch.tensor([True, False, True, True, False, False, False, False])
    wrong = torch.tensor([True, False, True, False, False, False, False, False])
    lines = {line["rule"]: line for line in rule_lines("shapley_k5", scores, is_flip, wrong)}
    assert (lines["value < −0 × mean"]["causes"], lines["value < −0 × mean"]["precision"]) == (3, pytest.approx(2 / 3))
    assert (lines["value < −1 × mean"]["causes"], lines["value < −1 × mean"]["recall"]) == (2, pytest.approx(1 / 3))
    assert lines["value < −0 × mean, argmax ≠ label"]["causes"] == 2  # θ̂ gets index 1 right: not a cause
    assert lines["value < −0 × mean, argmax ≠ label"]["precision"] == 1.0
    vote = rule_lines("vote_k5", torch.tensor([0.6, 0.8, 0.95, 0.2, 0.0, 0.0, 0.0, 0.0]), is_flip, wrong)
    assert [line["causes"] for line in vote] == [3, 2, 1]  # more than 50, 70, 90 % disagree
    summary = ap_summary([{"protocol": "pairs", "regime": "50k", "round_after_epoch": 3, "seed": seed,
                           "ranking": name, "ap": ap}
                          for seed, name, ap in ((0, "a", 0.5), (1, "a", 0.7), (0, "b", 0.4), (1, "b", 0.4))])
    assert "| `pairs` | `50k` | 3 | 0, 1 | **0.600** | 0.400 |" in summary


def test_the_rounds_table_tells_kept_rounds_from_rolled_back_ones_whose_causes_left():
    from benchmarks.fit_report import _rounds_section

    rounds = [{"epoch": 3, "accepted": False, "removed": 5}, {"epoch": 7, "accepted": True, "removed": 2},
              {"epoch": 9, "accepted": False, "removed": 0}]
    table = _rounds_section({"repair_removal_margin_2": {1: {"rounds": rounds, "precision": 0.5}}})
    assert "| RepairCallback(removal_margin=2) | 1 | 3 | 3 | 1 | 7 | 3, 7 | 7 | 0.50 |" in table


def test_the_clean_label_protocol_runs_only_when_asked_and_is_reported_last(tmp_path):
    import json

    from benchmarks import fit
    from benchmarks.fit_report import write_fit_results

    assert fit.parse_arguments([]).protocols == ["pairs", "symmetric"]
    assert fit.parse_arguments(["--collect"]).protocols == ["pairs", "symmetric", "none"]
    assert fit.parse_arguments(["--protocols", "none"]).protocols == ["none"]
    clean, pairs = fit.Setting("none", "3k-mem", 0, 150), fit.Setting("pairs", "3k-mem", 0, 150)
    for setting in (clean, pairs):
        for run, test in (("plain", 0.85), ("repair", 0.84), ("oracle", 0.86)):
            record = _record(run, 0, test, 10.0, precision=0.0 if run == "repair" else None)
            record["setting"]["protocol"] = setting.protocol
            fit.cache_path(setting, run, tmp_path).write_text(json.dumps(record))
    records = fit.collect([clean, pairs], ["plain", "repair", "oracle"], tmp_path)
    # With clean labels plain training is the oracle's fit: no oracle row, no gap closed.
    assert [(r["setting"]["protocol"], r["run"]) for r in records] == [
        ("none", "plain"), ("none", "repair"), ("pairs", "plain"), ("pairs", "repair"), ("pairs", "oracle")]
    write_fit_results(records, tmp_path / "out")
    report = (tmp_path / "out" / "fit.md").read_text()
    assert report.index("## `pairs`, `3k-mem`") < report.index("## `none`, `3k-mem`")
    clean_section = report.split("## `none`")[1]
    assert "Clean labels: no flips" in clean_section and "oracle (clean labels)" not in clean_section
