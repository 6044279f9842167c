"""lightning-repair: find the training examples behind a classifier's failures and unlearn them, on the fly."""

from lightning_repair.adapter import BatchAdapter
from lightning_repair.callback import RepairCallback

__version__ = "0.1.0"
__all__ = ["BatchAdapter", "RepairCallback", "__version__"]
