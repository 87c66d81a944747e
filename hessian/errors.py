"""The errors of the Hessian operator; each message names the fix."""


class HessianError(RuntimeError):
    """A problem that makes the Hessian ill-defined or uncomputable; the message names the fix."""


class NonDeterministicError(HessianError):
    """The loss is not a fixed function of the parameters (dropout, BatchNorm, shuffled data)."""


class ForwardModeError(HessianError):
    """An operation of the model has no forward-mode (jvp) rule."""
