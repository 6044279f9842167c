"""The speed benchmark's ResNet-18 section: one row per backend, with the ratio to the same fit's epoch, and a
failing backend reported with its reason instead of a number."""

from __future__ import annotations

from benchmarks.speed import RESNET_CONFIGS, resnet_report


def test_resnet_rows_divide_each_round_by_its_own_fits_epoch_and_name_a_failing_backend():
    results = [
        {"label": "RepairCallback()", "epoch": 20.0,
         "round": {"seconds_total": 30.0, "curvature": "torch_func", "seconds_fisher": 10.0, "seconds_scores": 5.0,
                   "seconds_treatment": 4.0}},
        {"label": "curvature='backpack'", "epoch": 25.0, "error": "RuntimeError: BackPACK cannot follow net.layer1"},
    ]
    table = "\n".join(resnet_report(results, n=2000))
    assert "| RepairCallback() | torch_func | 20.0 | 30.0 | **1.50** | 0.50 | 0.25 | 0.20 |" in table
    assert "| curvature='backpack' | fails: RuntimeError: BackPACK cannot follow net.layer1 | 25.0 |" in table
    assert "2,000 images" in table


def test_every_backend_is_measured_and_no_rows_means_no_section():
    forced = {config.get("curvature") for config in RESNET_CONFIGS.values()}
    assert {"backpack", "torch_func", None} <= forced
    assert resnet_report([], n=2000) == []
