"""Errors raised by influence methods; each message names the argument at fault."""


class NotFittedException(RuntimeError):
    """An influence method was used before `fit` (or `load_state_dict`)."""

    def __init__(self, method: str) -> None:
        super().__init__(
            f"{method} is not fitted: call fit(train_loader) or load_state_dict(state) first"
        )


class SingularHessianError(ValueError):
    """The (regularized) second-order matrix cannot be inverted."""
