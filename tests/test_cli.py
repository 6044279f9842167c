"""Tests of lightning_repair.cli and configs/: every config parses; the per-method files compose with the main one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lightning_repair import RepairCallback
from lightning_repair.cli import RepairCLI, main
from lightning_repair.identify import KNNShapley
from lightning_repair.round import RepairRound
from lightning_repair.treat import NewtonRemoval

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAIN = CONFIGS / "fashion_mnist_repair.yaml"
# Each per-method file, and the scorer or treatment it should put into the main config's RepairCallback.
METHODS = {
    "identify/ewc_influence.yaml": ("scorer", "lightning_repair.identify.EWCInfluence"),
    "identify/linear_influence.yaml": ("scorer", "lightning_repair.identify.LinearInfluence"),
    "identify/gradient_dot.yaml": ("scorer", "lightning_repair.identify.GradientDot"),
    "identify/knn_shapley.yaml": ("scorer", "lightning_repair.identify.KNNShapley"),
    "identify/knn_shapley_trusted.yaml": ("scorer", "lightning_repair.identify.KNNShapley"),
    "identify/training_loss.yaml": ("scorer", "lightning_repair.identify.TrainingLoss"),
    "identify/random.yaml": ("scorer", "lightning_repair.identify.RandomScores"),
    "treat/ewc_unlearning.yaml": ("treatment", "lightning_repair.treat.EWCUnlearning"),
    "treat/finetune.yaml": ("treatment", "lightning_repair.treat.Finetune"),
    "treat/newton_removal.yaml": ("treatment", "lightning_repair.treat.NewtonRemoval"),
    "treat/energy_alignment.yaml": ("treatment", "lightning_repair.treat.EnergyAlignment"),
    "treat/exclude.yaml": ("treatment", "lightning_repair.treat.Exclude"),
}
MAIN_METHODS = {"scorer": "lightning_repair.identify.KNNShapley", "treatment": "lightning_repair.treat.Exclude"}


@pytest.fixture(autouse=True)
def _no_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when it gets both `args` and command-line arguments (pytest's own).
    monkeypatch.setattr(sys, "argv", ["lightning-repair"])


def printed_config(capsys: pytest.CaptureFixture, *configs: Path) -> dict:
    """The composed config that ``lightning-repair fit --config ... --print_config`` prints."""
    args = ["fit"] + [arg for config in configs for arg in ("--config", str(config))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def repair_callback(config: dict) -> dict:
    """The RepairCallback's arguments: the config's keyed `repair:` section."""
    assert not config["trainer"].get("callbacks")  # the callback is not a positional list entry any more
    return config["repair"]


def test_every_config_is_tested() -> None:
    found = {path.relative_to(CONFIGS).as_posix() for path in CONFIGS.rglob("*.yaml")}
    assert found == {MAIN.name, *METHODS}


def test_main_config(capsys: pytest.CaptureFixture) -> None:
    config = printed_config(capsys, MAIN)
    init_args = repair_callback(config)
    assert {key: init_args[key]["class_path"] for key in MAIN_METHODS} == MAIN_METHODS
    assert (init_args["start_epoch"], init_args["top_fraction"], init_args["fisher"],
            init_args["fisher_samples"], init_args["control_margin"], init_args["removal_margin"]) == (
        None, None, "mc", 1000, 0.0, None)
    # The main config spells out the callback's default scorer.
    default_scorer = RepairRound().scorer
    assert init_args["scorer"]["init_args"]["utility"] == default_scorer.utility == "trusted"
    assert init_args["scorer"]["init_args"]["harm_margin"] == default_scorer.harm_margin == 1.0
    assert type(RepairRound().treatment).__name__ == "Exclude"
    assert config["trainer"]["max_epochs"] == 5
    assert config["model"]["class_path"] == "lightning_repair.models.ImageClassifier"
    assert config["data"]["class_path"] == "lightning_repair.data.FashionMNISTDataModule"
    assert config["data"]["init_args"]["noise"] == "pairs"


@pytest.mark.parametrize("method_file", sorted(METHODS))
def test_method_file_composes_with_main_config(capsys: pytest.CaptureFixture, method_file: str) -> None:
    init_args = repair_callback(printed_config(capsys, MAIN, CONFIGS / method_file))
    role, class_path = METHODS[method_file]
    assert {key: init_args[key]["class_path"] for key in MAIN_METHODS} == {**MAIN_METHODS, role: class_path}
    # The main config's other settings survive (its selection is each scorer's own rule).
    assert (init_args["start_epoch"], init_args["top_fraction"], init_args["fisher_samples"]) == (None, None, 1000)


def test_an_overlay_sets_the_scorer_settings_it_names_over_the_main_configs(capsys: pytest.CaptureFixture) -> None:
    # jsonargparse keeps init_args a config before set for the same class, so each KNN-Shapley overlay names its own.
    expected = {"knn_shapley.yaml": ("query", 0.0), "knn_shapley_trusted.yaml": ("trusted", 1.0)}
    for overlay, (utility, harm_margin) in expected.items():
        scorer = repair_callback(printed_config(capsys, MAIN, CONFIGS / "identify" / overlay))["scorer"]["init_args"]
        assert (scorer["utility"], scorer["harm_margin"]) == (utility, harm_margin)


def test_defaults_and_any_lightning_module(capsys: pytest.CaptureFixture) -> None:
    assert printed_config(capsys)["model"]["class_path"] == "lightning_repair.models.ImageClassifier"
    with pytest.raises(SystemExit):
        main(["fit", "--model", "lightning.pytorch.demos.boring_classes.BoringModel", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"].endswith("BoringModel")


def test_overlays_compose_whatever_other_callbacks_come_first(capsys: pytest.CaptureFixture, tmp_path: Path
                                                               ) -> None:
    # With a positional merge, a callback listed before the RepairCallback took the overlay's arguments.
    other = tmp_path / "other.yaml"
    other.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    config = printed_config(capsys, MAIN, other, CONFIGS / "treat/newton_removal.yaml")
    assert config["repair"]["treatment"]["class_path"] == "lightning_repair.treat.NewtonRemoval"
    [callback] = config["trainer"]["callbacks"]
    assert callback["class_path"].endswith("LearningRateMonitor") and "treatment" not in callback["init_args"]


def test_composed_config_instantiates(tmp_path: Path) -> None:
    cli = RepairCLI(run=False, args=["--config", str(MAIN),
                                     "--config", str(CONFIGS / "identify/knn_shapley_trusted.yaml"),
                                     "--config", str(CONFIGS / "treat/newton_removal.yaml"),
                                     "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                                     "--trainer.default_root_dir", str(tmp_path),
                                     "--repair.scorer.init_args.harm_margin", "1.5", "--repair.removal_margin", "2"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RepairCallback)]
    assert isinstance(callback.scorer, KNNShapley) and isinstance(callback.treatment, NewtonRemoval)
    assert callback.scorer.utility == "trusted" and callback.scorer.harm_margin == 1.5
    assert callback.selection == {}  # none given: the scorer's own rule, each round
    assert (callback.start_epoch, callback.settings.fisher_samples, callback.settings.removal_margin) == (None, 1000,
                                                                                                         2.0)
    assert cli.datamodule.train_dataset is None  # nothing read before `fit` calls setup
