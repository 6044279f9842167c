"""The ``lightning-repair`` command: LightningCLI with our model and data as defaults.

Run a repair from a config, and swap the identification or treatment method by adding its file (each sets keys
of the config's ``repair:`` section, the RepairCallback's arguments)::

    lightning-repair fit --config configs/fashion_mnist_repair.yaml
    lightning-repair fit --config configs/fashion_mnist_repair.yaml --config configs/identify/knn_shapley.yaml

The model defaults to :class:`~lightning_repair.models.ImageClassifier` and the data to
:class:`~lightning_repair.data.FashionMNISTDataModule`; any LightningModule or LightningDataModule can replace
them by ``class_path`` (``--model my_package.MyModel``). Add ``--print_config`` to see the composed config.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_repair.callback import RepairCallback


class RepairCLI(LightningCLI):
    """LightningCLI with a ``repair:`` section for the :class:`RepairCallback` it adds to the trainer, and any
    LightningModule and LightningDataModule, by default ours."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI's documented pattern: a keyed section, so overlays set `repair: {scorer: ...}` whatever
        # other callbacks the config lists.
        parser.add_lightning_class_args(RepairCallback, "repair")
        # Not `model_class=ImageClassifier` with subclass mode: that would accept only ImageClassifier's subclasses.
        parser.set_defaults({"model": {"class_path": "lightning_repair.models.ImageClassifier"},
                             "data": {"class_path": "lightning_repair.data.FashionMNISTDataModule"}})


def main(args: ArgsType = None) -> None:
    """Runs the command line; ``args`` (e.g. ``["fit", "--config", "repair.yaml"]``) replaces ``sys.argv[1:]``."""
    RepairCLI(args=args)
