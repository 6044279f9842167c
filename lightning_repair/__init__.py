"""lightning-repair: find the training examples behind a classifier's failures and unlearn them, on the fly."""

from lightning_repair.adapter import BatchAdapter
from lightning_repair.callback import RepairCallback
from lightning_repair.identify.base import Scorer
from lightning_repair.round import RepairRound, RoundOutcome, RoundRecord
from lightning_repair.treat.base import Treatment

__version__ = "0.1.0"
__all__ = ["BatchAdapter", "RepairCallback", "RepairRound", "RoundOutcome", "RoundRecord", "Scorer", "Treatment",
           "__version__"]
