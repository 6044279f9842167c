"""The ``lightning-repair`` command: LightningCLI with the repair defaults.

Run a repair from a config, and swap the identification or treatment method by adding its file::

    lightning-repair fit --config configs/fashion_mnist_repair.yaml
    lightning-repair fit --config configs/fashion_mnist_repair.yaml --config configs/identify/knn_shapley.yaml

The model defaults to :class:`~lightning_repair.models.ImageClassifier` and the data to
:class:`~lightning_repair.data.FashionMNISTDataModule`; any other LightningModule or LightningDataModule is
chosen by ``class_path``. ``lightning-repair fit --config ... --print_config`` shows the composed config.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.models import ImageClassifier


class RepairCLI(LightningCLI):
    """LightningCLI that accepts any LightningModule and LightningDataModule, defaulting to ours."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Subclass mode with model_class=ImageClassifier would only accept ImageClassifier's subclasses; so the
        # base stays LightningModule and our classes are defaults.
        parser.set_defaults({"model": {"class_path": f"{ImageClassifier.__module__}.{ImageClassifier.__name__}"},
                             "data": {"class_path": f"{FashionMNISTDataModule.__module__}."
                                                    f"{FashionMNISTDataModule.__name__}"}})


def main(args: ArgsType = None) -> RepairCLI:
    """Runs the command line; ``args`` (e.g. ``["fit", "--config", "repair.yaml"]``) replaces ``sys.argv[1:]``."""
    return RepairCLI(args=args)
