"""dykaf: the DyKAF optimizer (Kronecker-factored Fisher tracked by projector splitting, Adam in its
eigenbasis), SOAP as a configuration of the same engine, Fisher-fidelity diagnostics and a registry
of baseline optimizers. Depends on torch only."""

from dykaf.optimizer import SOAP, DyKAF, PreconditionerState

__all__ = ["SOAP", "DyKAF", "PreconditionerState"]
__version__ = "0.1.0"
