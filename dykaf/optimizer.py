"""The DyKAF optimizer: Kronecker factors of the Fisher, Adam in their eigenbasis.

One engine, three factor rules (``dykaf/docs/math.md``):

* ``parallel`` (default) and ``sequential`` — DyKAF's projector-splitting integrators;
* ``ema`` — Shampoo/SOAP statistics, which makes this engine SOAP (exported as :class:`SOAP`).

Per matrix parameter and step: rotate the gradient into the factors' eigenbases, update Adam's
second moment there (``full`` or the memory-saving ``rank1``), take the Adam step with the first
moment (kept in the original basis) rotated the same way, decoupled weight decay, then fold this
step's gradient into the factors and, every ``precondition_frequency`` steps, refresh the eigenbases.
1-D parameters (and matrices too large on both sides) run plain Adam.

Design choices worth knowing:

* Hyperparameters are read from the param group on every step (schedulers, resumed checkpoints).
  Structural ones — ``max_precond_dim``, ``precondition_1d``, ``second_moment`` and ``init`` — take
  effect when a parameter is initialised.
* All statistics are float32 for bf16/fp16/fp32 parameters and float64 for float64 parameters;
  ``p.grad`` is never modified.
* The first step of a preconditioned parameter only initialises (never uses a gradient inside its
  own projection); its Adam step counter therefore starts one step later, as in SOAP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from dykaf import eigenbasis, kronecker
from dykaf.options import DEFAULTS, DyKAFConfig, factor_beta
from dykaf.second_moment import rank1_denominator, update_rank1


@dataclass(frozen=True)
class PreconditionerState:
    """Read-only view of one parameter's preconditioner, for diagnostics.

    ``left``/``right`` are the Kronecker factors (None: identity side, beyond ``max_precond_dim``),
    ``left_basis``/``right_basis`` their eigenbases, ``second_moment`` the ``m × n`` Adam second
    moment in the rotated basis (materialised from its vectors for ``rank1``; None for an
    optimizer that does not run Adam in that basis, such as the registry's Shampoo). ``beta`` (the factor
    decay), ``init`` and ``updates`` (gradients folded into the factors so far) let the Fisher
    diagnostics recognise factors identical to one of their shadows and reuse them.
    """

    left: Tensor | None
    right: Tensor | None
    left_basis: Tensor | None
    right_basis: Tensor | None
    second_moment: Tensor | None
    matrix_shape: tuple[int, int]
    factor_rule: str
    beta: float | None = None
    init: str | None = None
    updates: int | None = None


def state_dtype(param: Tensor) -> torch.dtype:
    """float64 parameters keep float64 statistics; everything else gets float32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def matrix_shape(param: Tensor, precondition_1d: bool) -> tuple[int, int] | None:
    """The matrix a parameter is preconditioned as, or None when it runs plain Adam.

    Tensors with more than two dimensions become ``out × prod(rest)``; 1-D tensors become ``1 × n``
    only when ``precondition_1d`` is set (a 1×1 left factor is harmless and keeps one code path).
    """
    if param.ndim == 0 or (param.ndim == 1 and not precondition_1d):
        return None
    if param.ndim == 1:
        return (1, param.shape[0])
    return (param.shape[0], math.prod(param.shape[1:]))


class DyKAF(Optimizer):
    """DyKAF (arXiv 2511.06477) with the fixes listed in ``dykaf/docs/math.md``.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: Adam's ``(β1, β2)``.
        shampoo_beta: factor decay β; None means ``β2``.
        eps: Adam's ε (added to ``sqrt(v)``).
        weight_decay: decoupled weight decay (applied after the step, as in SOAP).
        precondition_frequency: steps between eigenbasis refreshes.
        max_precond_dim: a side longer than this gets no factor (identity rotation).
        factor_rule: ``"parallel"`` | ``"sequential"`` | ``"ema"`` (SOAP).
        second_moment: ``"full"`` | ``"rank1"``.
        init: ``"kron"`` | ``"eps"`` for the projector-splitting rules (``ema`` starts from zero).
        precondition_1d: precondition 1-D parameters as ``1 × n`` matrices instead of plain Adam.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULTS["lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        shampoo_beta: float | None = DEFAULTS["shampoo_beta"],
        eps: float = DEFAULTS["eps"],
        weight_decay: float = DEFAULTS["weight_decay"],
        precondition_frequency: int = DEFAULTS["precondition_frequency"],
        max_precond_dim: int = DEFAULTS["max_precond_dim"],
        factor_rule: str = DEFAULTS["factor_rule"],
        second_moment: str = DEFAULTS["second_moment"],
        init: str = DEFAULTS["init"],
        precondition_1d: bool = DEFAULTS["precondition_1d"],
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, list) else betas,
            "shampoo_beta": shampoo_beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "precondition_frequency": precondition_frequency,
            "max_precond_dim": max_precond_dim,
            "factor_rule": factor_rule,
            "second_moment": second_moment,
            "init": init,
            "precondition_1d": precondition_1d,
        }
        DyKAFConfig.from_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        DyKAFConfig.from_group(self.param_groups[-1])

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("DyKAF does not support sparse gradients")
                self._step_param(param, group)
        return loss

    def _step_param(self, param: Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            self._initialise(param, group, state)
            return
        grad = param.grad.to(state_dtype(param))
        if "exp_avg_sq" in state and state.get("matrix_shape") is None:
            self._adam_step(param, grad, group, state)
            return
        self._rotated_adam_step(param, grad, group, state)
        self._update_factors(grad.reshape(state["matrix_shape"]), group, state)
        if state["step"] % group["precondition_frequency"] == 0:
            self._refresh_bases(state)

    def _initialise(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Create the state; for preconditioned params also fold in the first gradient and stop.

        A gradient that is exactly zero (e.g. LoRA ``A`` at step 1) leaves the state empty so the
        parameter simply waits for its first informative gradient.
        """
        dtype = state_dtype(param)
        grad = param.grad.to(dtype)
        shape = matrix_shape(param, group["precondition_1d"])
        max_dim = group["max_precond_dim"]
        has_left = shape is not None and shape[0] <= max_dim
        has_right = shape is not None and shape[1] <= max_dim
        if not (has_left or has_right):
            state["step"] = 0
            state["matrix_shape"] = None
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
            self._adam_step(param, grad, group, state)
            return
        if not bool(torch.any(grad != 0)):
            return
        matrix = grad.reshape(shape)
        beta = factor_beta(group)
        rule = group["factor_rule"]
        if has_left and has_right:
            if rule == "ema":
                left, right = kronecker.update_ema(
                    torch.zeros(shape[0], shape[0], dtype=dtype, device=param.device),
                    torch.zeros(shape[1], shape[1], dtype=dtype, device=param.device),
                    matrix,
                    beta,
                )
            elif group["init"] == "kron":
                left, right = kronecker.init_kron(matrix, beta)
            else:
                left, right = kronecker.init_eps(*shape, dtype=dtype, device=param.device)
                left, right = kronecker.update_factors(rule, left, right, matrix, beta)
            state["left"], state["right"] = left, right
        elif has_left:
            zeros = torch.zeros(shape[0], shape[0], dtype=dtype, device=param.device)
            state["left"] = kronecker.update_one_sided(zeros, matrix, beta, "left")
        else:
            zeros = torch.zeros(shape[1], shape[1], dtype=dtype, device=param.device)
            state["right"] = kronecker.update_one_sided(zeros, matrix, beta, "right")
        for side in ("left", "right"):
            if side in state:
                state[f"{side}_basis"] = eigenbasis.initial(state[side])
        state["step"] = 0
        state["matrix_shape"] = shape
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
        if group["second_moment"] == "rank1" and param.ndim >= 2:
            state["v_row"] = torch.zeros(shape[0], dtype=dtype, device=param.device)
            state["v_col"] = torch.zeros(shape[1], dtype=dtype, device=param.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)

    @staticmethod
    def _step_size(group: dict[str, Any], step: int) -> float:
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

    @staticmethod
    def _apply(param: Tensor, direction: Tensor, group: dict[str, Any], step_size: float) -> None:
        """``p ← p − step_size·Δ`` then decoupled weight decay ``p ← p − lr·wd·p`` (SOAP's order)."""
        param.add_(direction.view_as(param).to(param.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])

    def _adam_step(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        direction = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])
        self._apply(param, direction, group, self._step_size(group, state["step"]))

    @staticmethod
    def _rotate(matrix: Tensor, state: dict[str, Any]) -> Tensor:
        """``Q_Lᵀ X Q_R`` (identity on a side without a factor)."""
        if "left_basis" in state:
            matrix = state["left_basis"].T @ matrix
        if "right_basis" in state:
            matrix = matrix @ state["right_basis"]
        return matrix

    @staticmethod
    def _rotate_back(matrix: Tensor, state: dict[str, Any]) -> Tensor:
        """``Q_L X Q_Rᵀ``."""
        if "left_basis" in state:
            matrix = state["left_basis"] @ matrix
        if "right_basis" in state:
            matrix = matrix @ state["right_basis"].T
        return matrix

    def _rotated_adam_step(
        self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        beta1, beta2 = group["betas"]
        shape = state["matrix_shape"]
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        rotated_grad = self._rotate(grad.reshape(shape), state)
        if "v_row" in state:
            state["v_row"], state["v_col"] = update_rank1(
                state["v_row"], state["v_col"], rotated_grad.square(), beta2
            )
            denominator = rank1_denominator(state["v_row"], state["v_col"], group["eps"])
        else:
            second = state["exp_avg_sq"]
            second.mul_(beta2).addcmul_(rotated_grad, rotated_grad, value=1.0 - beta2)
            denominator = second.sqrt().add_(group["eps"])
        rotated_momentum = self._rotate(state["exp_avg"].reshape(shape), state)
        direction = self._rotate_back(rotated_momentum / denominator, state)
        self._apply(param, direction, group, self._step_size(group, state["step"]))

    @staticmethod
    def _update_factors(matrix: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        beta = factor_beta(group)
        if "left" in state and "right" in state:
            state["left"], state["right"] = kronecker.update_factors(
                group["factor_rule"], state["left"], state["right"], matrix, beta
            )
        elif "left" in state:
            state["left"] = kronecker.update_one_sided(state["left"], matrix, beta, "left")
        else:
            state["right"] = kronecker.update_one_sided(state["right"], matrix, beta, "right")

    @staticmethod
    def _refresh_bases(state: dict[str, Any]) -> None:
        """Refresh each eigenbasis and permute the second moment with the same column order."""
        for dim, side in enumerate(("left", "right")):
            if side not in state:
                continue
            state[f"{side}_basis"], order = eigenbasis.refresh(state[side], state[f"{side}_basis"])
            if "exp_avg_sq" in state:
                state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
            else:
                key = "v_row" if dim == 0 else "v_col"
                state[key] = state[key][order]

    # ------------------------------------------------------------------ introspection
    def preconditioner_state(self, param: Tensor) -> PreconditionerState | None:
        """The preconditioner applied to ``param`` (None before initialisation or for Adam params)."""
        state = self.state.get(param)
        if not state or state.get("matrix_shape") is None:
            return None
        second = torch.outer(state["v_row"], state["v_col"]) if "v_row" in state else state["exp_avg_sq"]
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        return PreconditionerState(
            left=state.get("left"),
            right=state.get("right"),
            left_basis=state.get("left_basis"),
            right_basis=state.get("right_basis"),
            second_moment=second,
            matrix_shape=state["matrix_shape"],
            factor_rule=group["factor_rule"],
            beta=factor_beta(group),
            init=group["init"],
            # The initialising step folds in the first gradient and leaves ``step`` at 0.
            updates=int(state["step"]) + 1,
        )

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping each state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype,
        which would silently turn a bf16 model's float32 factors into bf16 ones. We restore the
        saved tensors (moved to the parameter's device) after the base class has done its mapping.
        """
        super().load_state_dict(state_dict)
        params = list(chain.from_iterable(group["params"] for group in self.param_groups))
        for index, saved in state_dict["state"].items():
            param = params[int(index)]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    self.state[param][key] = value.to(device=param.device, copy=True)


class SOAP(DyKAF):
    """SOAP (Vyas et al., 2024) as a configuration of the DyKAF engine: ``factor_rule="ema"``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> None:
        kwargs.setdefault("factor_rule", "ema")
        super().__init__(params, **kwargs)
