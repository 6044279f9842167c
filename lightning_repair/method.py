"""What every identification method and treatment shares: it is configured by its hyperparameters alone."""

from __future__ import annotations


class Method:
    """A scorer or treatment whose attributes are its hyperparameters.

    The built-in methods are ``@dataclass(kw_only=True)`` classes: their fields are the hyperparameters, each
    default written once, on its field, and the dataclass repr names the configuration, from which a round's record
    and the callback's state key are built: ``NewtonRemoval(damping=0.001, ...)``. This repr gives a subclass that
    is not a dataclass the same form, from its attributes, so that its state key too is the same in every run.
    """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
