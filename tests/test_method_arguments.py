"""How the methods take their hyperparameters: as keyword-only dataclass fields, each default written once, none
repeated in configs/."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentError, ArgumentParser

from lightning_repair import RepairCallback, identify, treat
from lightning_repair.curvature import natural_gradient
from lightning_repair.identify import (EWCInfluence, GradientDot, KNNShapley, LinearInfluence, RandomScores, Scorer,
                                       TrainingLoss, ewc_influence, knn_shapley_values, linear_influence, training_loss)
from lightning_repair.optimize import fit_to_failures
from lightning_repair.treat import (BestOf, EnergyAlignment, EWCUnlearning, Finetune, NewtonRemoval, Treatment,
                                    energy_alignment, ewc_unlearning, finetune, newton_removal)
from lightning_repair.treat.energy import align_inputs, aligned_causes, energy_alignment_candidates
from lightning_repair.treat.ewc_unlearning import ewc_unlearning_candidates
from lightning_repair.treat.finetune import finetune_candidates
from lightning_repair.treat.newton import lissa_inverse_hvp, newton_candidates

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Every scorer and treatment the package exports.
METHODS = sorted({value for package in (identify, treat) for value in vars(package).values()
                  if isinstance(value, type) and issubclass(value, (Scorer, Treatment))
                  and not inspect.isabstract(value)}, key=lambda method: method.__name__)

# Each function whose hyperparameters are a class's, with {its argument: the class's argument}; None: every
# argument of the class, under the same name.
SHARED_DEFAULTS = [
    (ewc_influence, EWCInfluence, None),
    (fit_to_failures, EWCInfluence, None),
    (linear_influence, LinearInfluence, None),
    (linear_influence, GradientDot, None),
    (natural_gradient, LinearInfluence, {"damping": "damping"}),
    (finetune, Finetune, None),
    (finetune_candidates, Finetune, None),
    (ewc_unlearning, EWCUnlearning, None),
    (ewc_unlearning_candidates, EWCUnlearning,
     {name: name for name in ("objective", "gamma", "lr", "max_steps", "eval_every", "modules")}),
    (newton_removal, NewtonRemoval, None),
    (newton_candidates, NewtonRemoval, None),
    (natural_gradient, NewtonRemoval, {"damping": "damping"}),
    (lissa_inverse_hvp, NewtonRemoval, {"steps": "lissa_steps", "damping": "lissa_damping"}),
    (energy_alignment, EnergyAlignment, None),
    (energy_alignment_candidates, EnergyAlignment, None),
    (aligned_causes, EnergyAlignment, {"step_size": "step_size", "steps": "steps", "mode": "mode"}),
    (align_inputs, EnergyAlignment, {"step_size": "step_size", "steps": "steps"}),
    (fit_to_failures, EnergyAlignment, {"lr": "fit_lr", "max_steps": "fit_steps"}),
    (knn_shapley_values, KNNShapley, {"k": "k", "batch_size": "batch_size"}),
]

# Each method function and how many data arguments it takes by position.
DATA_ARGUMENTS = [
    (ewc_influence, 6), (linear_influence, 4), (training_loss, 2), (fit_to_failures, 5), (finetune, 3),
    (finetune_candidates, 2), (ewc_unlearning, 4), (ewc_unlearning_candidates, 3), (newton_removal, 5),
    (newton_candidates, 4), (energy_alignment, 7), (energy_alignment_candidates, 6), (knn_shapley_values, 4),
]


@pytest.mark.parametrize("function, method, names", SHARED_DEFAULTS,
                         ids=[f"{f.__name__}-{m.__name__}" for f, m, _ in SHARED_DEFAULTS])
def test_functions_default_to_their_class_defaults(function: Callable, method: type, names: dict | None) -> None:
    arguments = inspect.signature(function).parameters
    hyperparameters = inspect.signature(method).parameters
    for name, class_name in (names or {name: name for name in hyperparameters}).items():
        assert arguments[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert arguments[name].default == hyperparameters[class_name].default, name


@pytest.mark.parametrize("function, data", DATA_ARGUMENTS, ids=[f.__name__ for f, _ in DATA_ARGUMENTS])
def test_hyperparameters_by_position_raise_type_error(function: Callable, data: int) -> None:
    # Python refuses the call before the function runs, so the arguments need not be real.
    with pytest.raises(TypeError, match=f"takes from .* {data} positional|takes {data} positional"):
        function(*[None] * (data + 1))


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value  # YAML has lists only


@pytest.mark.parametrize("config", sorted(CONFIGS.rglob("*.yaml")),
                         ids=lambda path: path.relative_to(CONFIGS).as_posix())
def test_configs_set_only_arguments_that_differ_from_the_defaults(config: Path) -> None:
    repair = yaml.safe_load(config.read_text())["repair"]
    main = yaml.safe_load((CONFIGS / "fashion_mnist_repair.yaml").read_text())["repair"]
    for role, method in ((role, repair[role]) for role in ("scorer", "treatment") if role in repair):
        module, name = method["class_path"].rsplit(".", 1)
        defaults = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        # An overlay of the main config's own class must reset what the main config set (LightningCLI keeps it).
        resets = set(main[role].get("init_args", {})) if main[role]["class_path"] == method["class_path"] else set()
        for argument, value in method.get("init_args", {}).items():
            assert argument in defaults, f"{config.name}: {name} has no argument {argument!r}"
            assert value != _plain(defaults[argument].default) or argument in resets, \
                f"{config.name} repeats {name}'s default {argument}={value!r}; leave it out"


@pytest.mark.parametrize("method", [*METHODS, RepairCallback], ids=lambda method: method.__name__)
def test_classes_take_every_argument_by_keyword(method: type) -> None:
    for name, parameter in inspect.signature(method).parameters.items():
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"{method.__name__}({name})"


def test_every_method_is_checked() -> None:
    assert {m for _, m, _ in SHARED_DEFAULTS} | {BestOf, RandomScores, TrainingLoss} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_methods_are_dataclasses_of_their_hyperparameters(method: type) -> None:
    assert dataclasses.is_dataclass(method)
    fields = dataclasses.fields(method)
    for field in fields:
        assert field.kw_only, f"{method.__name__}.{field.name} is positional"
        assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING, \
            f"{method.__name__}.{field.name} has no default"
    # What describes the class, not a configuration, stays on the class.
    assert not {field.name for field in fields} & {"needs_fisher", "natural_threshold", "shardable"}
    with pytest.raises(TypeError, match="positional"):
        method(*[None] * (len(fields) + 1))
    # A round's record and the callback's state key name the configuration by its repr.
    configured = method()
    listed = ", ".join(f"{field.name}={getattr(configured, field.name)!r}" for field in fields)
    assert repr(configured) == f"{method.__name__}({listed})"


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_the_cli_checks_each_hyperparameter_against_its_type(method: type) -> None:
    # Types jsonargparse cannot resolve go unchecked: a typo in a config would then fail only inside a round.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(method, "method")
    defaults = method()
    for field in dataclasses.fields(method):
        if isinstance(getattr(defaults, field.name), (str, type(None))):
            continue  # a string may be a right value
        with pytest.raises(ArgumentError):
            parser.parse_args([f"--method.{field.name}", "not-a-value"])


def test_a_method_that_is_no_dataclass_is_named_by_its_attributes() -> None:
    class Constant(Scorer):
        def __init__(self, *, value: float = 1.0) -> None:
            self.value = value

        def score(self, inputs):
            return inputs

    assert repr(Constant(value=2.0)) == "Constant(value=2.0)"  # the same in every run, unlike object's repr
