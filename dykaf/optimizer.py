"""The DyKAF optimizer: Kronecker factors of the Fisher, Adam in their eigenbasis.

One engine, three factor rules (``dykaf/docs/math.md``):

* ``parallel`` (default) and ``sequential`` — DyKAF's projector-splitting integrators;
* ``ema`` — Shampoo/SOAP statistics, which makes this engine SOAP (exported as :class:`SOAP`).

Per matrix parameter and step: rotate the gradient into the factors' eigenbases, update Adam's
second moment there (``full`` or the memory-saving ``rank1``), take the Adam step with the first
moment (kept in the original basis) rotated the same way, decoupled weight decay, then fold this
step's gradient into the factors and, every ``precondition_frequency`` steps, refresh the eigenbases.
1-D parameters (and matrices too large on both sides) run plain Adam.

The work is done once per *block* of same-shape matrices, not once per matrix (``dykaf/blocks.py``):
a 12-layer transformer's step costs about as many kernel launches as a 2-layer one's. Plain-Adam
parameters and weight decay use ``torch._foreach_*``. After a parameter's initialising step no
operation waits for the device.

Design choices worth knowing:

* ``optimizer.state[p]`` keeps the per-parameter format (views into the block's stacked tensors),
  so checkpoints and ``preconditioner_state`` are unchanged.
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

from dykaf import blocks, eigenbasis, kronecker
from dykaf.blocks import BlockHyper, MatrixBlock
from dykaf.options import DEFAULTS, DyKAFConfig, factor_beta


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


def _block_key(state: dict[str, Any]) -> tuple[Any, ...]:
    """Matrices with equal keys (within one param group) are stepped as one block: same matrix
    shape, state dtype and device, factor sides, second-moment kind and step count."""
    exp_avg = state["exp_avg"]
    return (
        tuple(state["matrix_shape"]),
        exp_avg.dtype,
        exp_avg.device,
        "left" in state,
        "right" in state,
        "v_row" in state,
        state["step"],
    )


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


def factored_sides(shape: tuple[int, int], max_precond_dim: int) -> tuple[bool, bool]:
    """Which sides of an ``m × n`` matrix get a Kronecker factor: those within ``max_precond_dim``
    (a longer side is left unrotated; with neither, the parameter runs plain Adam)."""
    return shape[0] <= max_precond_dim, shape[1] <= max_precond_dim


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
        compile_step: run each block's step through ``torch.compile`` (off by default: it pays only
            where launches dominate, see BENCHMARKS.md "Batched engine"; the first steps compile).
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
        compile_step: bool = False,
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
        if not isinstance(compile_step, bool):
            raise ValueError(f"compile_step must be true or false, got {compile_step!r}")
        self.compile_step = compile_step
        self._blocks: dict[tuple[int, ...], MatrixBlock] = {}
        self._math: blocks.BlockMath = blocks.compile_block_step() if compile_step else blocks.block_math

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        DyKAFConfig.from_group(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compile_step", False)
        self.__dict__.setdefault("_blocks", {})
        self.__dict__.setdefault("_math", blocks.block_math)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        used: dict[tuple[int, ...], MatrixBlock] = {}
        for group in self.param_groups:
            self._step_group(group, used)
        # Blocks not used this step are dropped: their members now live in other blocks (or wait).
        self._blocks = used
        return loss

    def _step_group(self, group: dict[str, Any], used: dict[tuple[int, ...], MatrixBlock]) -> None:
        """Initialise new parameters one by one, then step the Adam-routed ones with ``_foreach``
        calls and the preconditioned ones block by block, then decay them all in one call."""
        adam: list[Tensor] = []
        members: dict[tuple[Any, ...], list[Tensor]] = {}
        fresh: dict[tuple[Any, ...], list[Tensor]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("DyKAF does not support sparse gradients")
            state = self.state[param]
            if not state:
                self._initialise(param, group, state)
                if state.get("matrix_shape", ()) is None:
                    adam.append(param)  # plain Adam takes its first step at once
                elif state:
                    fresh.setdefault(_block_key(state), []).append(param)
            elif state["matrix_shape"] is None:
                adam.append(param)
            else:
                members.setdefault(_block_key(state), []).append(param)
        # Newly initialised matrices are stacked now, with the other one-off work, so that the
        # steps after the first only ever reuse blocks.
        for params in fresh.values():
            used[tuple(id(p) for p in params)] = self._block_for(params)
        stepped = list(adam)
        if adam:
            self._adam_step(adam, group)
        hyper = BlockHyper(
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            eps=group["eps"],
            factor_beta=factor_beta(group),
            factor_rule=group["factor_rule"],
            precondition_frequency=group["precondition_frequency"],
        )
        for params in members.values():
            block = self._block_for(params)
            used[tuple(id(p) for p in params)] = block
            blocks.step_block(block, hyper, self._math)
            for param in params:
                self.state[param]["step"] = block.step
            stepped += params
        if stepped and group["weight_decay"] > 0:
            # p ← p − lr·wd·p after the step (SOAP's order), for every stepped parameter at once.
            torch._foreach_add_(stepped, stepped, alpha=-group["lr"] * group["weight_decay"])

    def _block_for(self, params: list[Tensor]) -> MatrixBlock:
        """The cached block of exactly these parameters, or a new one stacked from their state."""
        block = self._blocks.get(tuple(id(p) for p in params))
        states = [self.state[p] for p in params]
        if block is None or block.step != states[0]["step"]:
            block = MatrixBlock.stack(params, states)
            block.bind(states)
        return block

    def _initialise(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Create the state; for preconditioned params also fold in the first gradient.

        A gradient that is exactly zero (e.g. LoRA ``A`` at step 1) leaves the state empty so the
        parameter simply waits for its first informative gradient. This runs once per parameter
        and may wait for the device (the zero test, ``eigh``'s finiteness checks); steps after it
        never do.
        """
        dtype = state_dtype(param)
        grad = param.grad.to(dtype)
        shape = matrix_shape(param, group["precondition_1d"])
        has_left, has_right = (
            (False, False) if shape is None else factored_sides(shape, group["max_precond_dim"])
        )
        if not (has_left or has_right):
            state["step"] = 0
            state["matrix_shape"] = None
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
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

    def _adam_step(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Plain Adam for the parameters without factors: one ``_foreach`` call per operation.

        Parameters whose step counts differ (one joined late) get their own bias correction
        through a per-tensor scalar list; gradients are cast to the state dtype only where it
        differs (bf16 parameters).
        """
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        sizes = []
        for state in states:
            state["step"] += 1
            sizes.append(self._step_size(group, state["step"]))
        grads = [
            p.grad if p.grad.dtype == s["exp_avg"].dtype else p.grad.to(s["exp_avg"].dtype)
            for p, s in zip(params, states, strict=True)
        ]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, group["eps"])
        directions = torch._foreach_div(exp_avgs, denominators)
        if all(size == sizes[0] for size in sizes):
            torch._foreach_add_(params, directions, alpha=-sizes[0])
        else:
            torch._foreach_mul_(directions, [-size for size in sizes])
            torch._foreach_add_(params, directions)

    @staticmethod
    def _step_size(group: dict[str, Any], step: int) -> float:
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

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
        # The loaded tensors are the state now; blocks are stacked from them at the next step.
        self._blocks = {}


class SOAP(DyKAF):
    """SOAP (Vyas et al., 2024) as a configuration of the DyKAF engine: ``factor_rule="ema"``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> None:
        kwargs.setdefault("factor_rule", "ema")
        super().__init__(params, **kwargs)
