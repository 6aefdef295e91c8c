"""The registry's Shampoo, able to show its own Kronecker factors to the Fisher diagnostics.

pytorch-optimizer's ``ScalableShampoo`` keeps each matrix's statistics ``L ≈ E[GGᵀ]``,
``R ≈ E[GᵀG]`` and their inverse roots inside a ``PreConditioner`` object. The Fisher probes ask
an optimizer for ``preconditioner_state(param)`` (``dykaf.optimizer.PreconditionerState``), as
DyKAF and SOAP provide, to report the run's **own** factors next to the shadows'. This subclass
answers that for Shampoo:

- ``left``/``right``: the statistics themselves (an EMA with β2 that starts from ``matrix_eps·I``,
  so they never link to the SOAP/Shampoo shadow, which starts from zero);
- ``left_basis``/``right_basis``: the eigenvectors of the inverse roots Shampoo last computed,
  i.e. the rotation it actually applies (refreshed every ``precondition_frequency`` steps), as
  DyKAF/SOAP report the basis they apply rather than a fresh one;
- no second moment: Shampoo's step is ``L^-1/p G R^-1/p`` rescaled by grafting, not Adam in a
  rotated basis, so ``precond_rel_err`` (defined for that form) is not reported.

Only a matrix Shampoo preconditions as one block with both sides has such a pair; a blocked matrix
(a side longer than ``block_size``) has one pair per block and reports no own factors.
"""

from __future__ import annotations

import functools

from torch import Tensor
from torch.optim import Optimizer

from dykaf.baselines.optional import pytorch_optimizer
from dykaf.linalg import eigh
from dykaf.optimizer import PreconditionerState


def shampoo_preconditioner_state(optimizer: Optimizer, param: Tensor) -> PreconditionerState | None:
    """``param``'s Shampoo factors as a ``PreconditionerState`` (None: not stepped yet, or blocked)."""
    state = optimizer.state.get(param)
    pre = state.get("pre_conditioner") if state else None
    if pre is None or param.ndim != 2 or list(pre.transformed_shape) != list(param.shape):
        return None
    statistics, roots = pre.statistics, pre.pre_conditioners
    if len(statistics) != 2 or len(roots) != 2:  # blocked, or a side left unpreconditioned
        return None
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return PreconditionerState(
        left=statistics[0],
        right=statistics[1],
        left_basis=eigh(roots[0])[1],
        right_basis=eigh(roots[1])[1],
        second_moment=None,  # not Adam in a rotated basis (see above)
        matrix_shape=(int(param.shape[0]), int(param.shape[1])),
        factor_rule="shampoo",
        beta=float(group["betas"][1]),
        init="eps",
        updates=int(group.get("step", 0)),
    )


@functools.cache
def shampoo_class() -> type[Optimizer]:
    """``ScalableShampoo`` with ``preconditioner_state`` (built on first use: pytorch-optimizer is
    an optional dependency of the library)."""
    scalable_shampoo = pytorch_optimizer("shampoo").ScalableShampoo

    class ShampooWithFactors(scalable_shampoo):  # type: ignore[misc]
        def preconditioner_state(self, param: Tensor) -> PreconditionerState | None:
            return shampoo_preconditioner_state(self, param)

    return ShampooWithFactors
