"""Shadow Kronecker-factor estimators fed the probed layer's gradients every step.

A shadow holds exactly the factors a SOAP/Shampoo or DyKAF optimizer would hold for this layer
(same update rules from ``dykaf.kronecker``, same initialisation), whichever optimizer is actually
training, so every run can show all methods side by side against the same Fisher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dykaf.fisher.rows import DYKAF, DYKAF_SEQ, SOAP_SHAMPOO
from dykaf.kronecker import init_kron, update_factors

# Shadow method name → factor rule. "soap_shampoo": SOAP's factors are Shampoo's statistics (EMA of
# GGᵀ and GᵀG), so one name covers both; "dykaf" is the parallel rule, "dykaf_seq" the sequential one.
SHADOW_RULES: dict[str, str] = {SOAP_SHAMPOO: "ema", DYKAF: "parallel", DYKAF_SEQ: "sequential"}


@dataclass
class ShadowFactors:
    """One rule's running ``(L, R)``; ``None`` until the first usable gradient.

    ``ema`` starts from zero matrices and integrates the first gradient like SOAP; the
    projector-splitting rules use the ``kron`` initialisation (the optimal Kronecker approximation of
    the first EMA term) and wait while the gradient is exactly zero, as the optimizer does.
    """

    rule: str
    left: Tensor | None = None
    right: Tensor | None = None
    steps: int = field(default=0)

    def update(self, grad: Tensor, beta: float) -> None:
        """Feed one ``m × n`` gradient, or a stacked ``b × m × n`` block of same-shape layers'
        (tracked as ``b`` independent factor pairs, exactly as the optimizer's blocks do). The
        gradient is never modified."""
        if self.left is None or self.right is None:
            if self.rule == "ema":
                rows, cols = grad.shape[-2:]
                self.left = grad.new_zeros(*grad.shape[:-2], rows, rows)
                self.right = grad.new_zeros(*grad.shape[:-2], cols, cols)
            else:
                # Host sync, but only until the first non-zero gradient arrives.
                if not bool(torch.any(grad != 0)):
                    return
                self.left, self.right = init_kron(grad, beta)
                self.steps = 1
                return
        self.left, self.right = update_factors(self.rule, self.left, self.right, grad, beta)
        self.steps += 1
