"""What every identification method and treatment shares: it is configured by its hyperparameters alone."""

from __future__ import annotations


class Method:
    """A scorer or treatment whose attributes are its hyperparameters.

    Its repr lists them, so a round's record and the callback's state key name the configuration:
    ``NewtonRemoval(damping=0.001, ...)``.
    """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
