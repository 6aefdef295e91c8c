"""Blocks: a param group's same-shape preconditioned matrices, stepped together.

A transformer repeats a handful of matrix shapes in every layer. Stepping its matrices one by one
dispatches the same few dozen small kernels once per matrix, which on a GPU is launch-bound. A
``MatrixBlock`` stacks the state of ``b`` matrices of one shape, state dtype, device, param group,
factor sides, second-moment kind and step count (``b × m × m`` factors and bases, ``b × m × n``
moments), so that one step is a fixed number of batched operations (``bmm``/``baddbmm``, batched
``argsort``/QR) whatever ``b`` is.

The per-parameter state that users checkpoint and inspect (``optimizer.state[p]``) holds views into
the block's stacked tensors, which are always updated in place: it stays current without copies,
and a block can be rebuilt from it at any time (after ``load_state_dict``, or when a parameter
leaves or joins). A block is cut into contiguous slices along its first dimension with
:meth:`MatrixBlock.slice`; stepping the slices one after another is stepping the block, which is
what lets a rank own part of a block.

Nothing in :func:`step_block` reads a tensor's value on the host: a step never waits for the device
and can be captured or compiled (``compile_block_step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dykaf import eigenbasis, kronecker
from dykaf.second_moment import rank1_denominator, update_rank1

# The stacked state keys, in the per-parameter names of ``optimizer.state[p]``.
STACKED_KEYS: tuple[str, ...] = (
    "left",
    "right",
    "left_basis",
    "right_basis",
    "exp_avg",
    "exp_avg_sq",
    "v_row",
    "v_col",
)


@dataclass(frozen=True)
class BlockHyper:
    """The hyperparameters one block step reads, taken from the param group on every step."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    factor_beta: float
    factor_rule: str
    precondition_frequency: int

    def step_size(self, step: int) -> float:
        """Adam's bias-corrected step size ``lr·sqrt(1-β2ᵗ)/(1-β1ᵗ)`` (a host float: no kernel)."""
        return self.lr * math.sqrt(1.0 - self.beta2**step) / (1.0 - self.beta1**step)


@dataclass(eq=False)
class MatrixBlock:
    """``b`` same-shape matrices' stacked state, their parameters and one work buffer.

    ``tensors`` holds the stacked state under the ``STACKED_KEYS`` present and transposed views of
    the bases (``left_basis_t``, ``right_basis_t``). ``buffer`` (``b × m × n``, state dtype) first
    receives the gradients and finally the update direction; ``buffer_views`` are its
    per-parameter views in each parameter's own shape, so that the gradients are gathered and the
    parameters updated with one ``_foreach`` call each.
    """

    params: list[Tensor]
    matrix_shape: tuple[int, int]
    step: int
    tensors: dict[str, Tensor]
    buffer: Tensor
    buffer_views: list[Tensor]

    @classmethod
    def stack(cls, params: Sequence[Tensor], states: Sequence[Mapping[str, Any]]) -> MatrixBlock:
        """Stack the per-parameter states of ``params`` (all with the same step and layout)."""
        shape = tuple(states[0]["matrix_shape"])
        tensors = {
            key: torch.stack([state[key].reshape(_shape_of(state, key)) for state in states])
            for key in STACKED_KEYS
            if key in states[0]
        }
        # Transposed views of the bases, made once: the bases are only ever updated in place.
        for side in ("left_basis", "right_basis"):
            if side in tensors:
                tensors[f"{side}_t"] = tensors[side].mT
        buffer = torch.empty_like(tensors["exp_avg"])
        views = [buffer[i].view(p.shape) for i, p in enumerate(params)]
        return cls(list(params), (shape[0], shape[1]), int(states[0]["step"]), tensors, buffer, views)

    def bind(self, states: Sequence[dict[str, Any]]) -> None:
        """Point each parameter's state entries at its slice of the stacked tensors."""
        for index, (param, state) in enumerate(zip(self.params, states, strict=True)):
            for key in STACKED_KEYS:
                if key not in self.tensors:
                    continue
                stacked = self.tensors[key]
                view = stacked[index]
                state[key] = view.view(param.shape) if key == "exp_avg" else view

    def __len__(self) -> int:
        return len(self.params)

    def slice(self, start: int, stop: int) -> MatrixBlock:
        """Matrices ``start:stop`` as a block whose tensors are views of this one's (no copy)."""
        return MatrixBlock(
            self.params[start:stop],
            self.matrix_shape,
            self.step,
            {key: value[start:stop] for key, value in self.tensors.items()},
            self.buffer[start:stop],
            self.buffer_views[start:stop],
        )


def contiguous_shares(count: int, parts: int) -> list[tuple[int, int]]:
    """Balanced contiguous ``(start, stop)`` ranges of ``count`` matrices for ``parts`` owners (the
    first ``count % parts`` get one more; owners beyond ``count`` get an empty range)."""
    base, extra = divmod(count, parts)
    shares, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        shares.append((start, stop))
        start = stop
    return shares


def _shape_of(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """The stacked shape of one parameter's entry: moments as the ``m × n`` matrix."""
    if key in ("exp_avg", "exp_avg_sq"):
        return tuple(state["matrix_shape"])
    return tuple(state[key].shape)


def _rotate(matrix: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
    """``Q_Lᵀ X Q_R`` per matrix (identity on a side without a factor)."""
    if "left_basis" in tensors:
        matrix = torch.bmm(tensors["left_basis_t"], matrix)
    if "right_basis" in tensors:
        matrix = torch.bmm(matrix, tensors["right_basis"])
    return matrix


def _rotate_back_into(matrix: Tensor, tensors: Mapping[str, Tensor], out: Tensor) -> None:
    """``out ← Q_L X Q_Rᵀ`` per matrix, the last product written straight into ``out``."""
    if "left_basis" in tensors and "right_basis" in tensors:
        torch.bmm(torch.bmm(tensors["left_basis"], matrix), tensors["right_basis_t"], out=out)
    elif "left_basis" in tensors:
        torch.bmm(tensors["left_basis"], matrix, out=out)
    else:
        torch.bmm(matrix, tensors["right_basis_t"], out=out)


def _update_factors(tensors: dict[str, Tensor], grad: Tensor, rule: str, beta: float) -> None:
    if "left" in tensors and "right" in tensors:
        left, right = kronecker.update_factors(rule, tensors["left"], tensors["right"], grad, beta)
        tensors["left"].copy_(left)
        tensors["right"].copy_(right)
    elif "left" in tensors:
        tensors["left"].copy_(kronecker.update_one_sided(tensors["left"], grad, beta, "left"))
    else:
        tensors["right"].copy_(kronecker.update_one_sided(tensors["right"], grad, beta, "right"))


def _refresh_bases(tensors: dict[str, Tensor]) -> None:
    """Refresh each eigenbasis and permute the second moment with the same column order."""
    for dim, side in ((1, "left"), (2, "right")):
        if side not in tensors:
            continue
        basis, order = eigenbasis.refresh(tensors[side], tensors[f"{side}_basis"])
        tensors[f"{side}_basis"].copy_(basis)
        if "exp_avg_sq" in tensors:
            second = tensors["exp_avg_sq"]
            index = order.unsqueeze(-1 if dim == 1 else -2).expand_as(second)
            second.copy_(torch.gather(second, dim, index))
        else:
            key = "v_row" if dim == 1 else "v_col"
            tensors[key].copy_(torch.gather(tensors[key], 1, order))


def block_math(
    tensors: dict[str, Tensor],
    buffer: Tensor,
    buffer_views: list[Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    factor_beta: float,
    factor_rule: str,
    step_size: float | Tensor,
    refresh: bool,
) -> None:
    """The tensor work of one block step, all in place (the part ``compile_block_step`` compiles).

    Rotate the gradients into the eigenbases, update Adam's second moment there, take the Adam
    step with the rotated first moment, fold the gradients into the factors and, when ``refresh``,
    refresh the eigenbases. The order is SOAP's: the step uses the bases of the previous refresh.
    ``step_size`` is a float, or a 0-d tensor when compiled (a float would be baked into the graph
    and recompile it at every step, as Adam's bias correction changes it).
    """
    torch._foreach_copy_(buffer_views, grads)  # gather (and cast) the gradients: one call
    grad = buffer
    tensors["exp_avg"].lerp_(grad, 1.0 - beta1)
    rotated = _rotate(grad, tensors)
    if "v_row" in tensors:
        row, col = update_rank1(tensors["v_row"], tensors["v_col"], rotated.square(), beta2)
        tensors["v_row"].copy_(row)
        tensors["v_col"].copy_(col)
        denominator = rank1_denominator(tensors["v_row"], tensors["v_col"], eps)
    else:
        second = tensors["exp_avg_sq"]
        second.mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
        denominator = second.sqrt().add_(eps)
    scaled = _rotate(tensors["exp_avg"], tensors).div_(denominator)
    # The factors read this step's gradients, so they are updated before the buffer is reused.
    _update_factors(tensors, grad, factor_rule, factor_beta)
    _rotate_back_into(scaled, tensors, out=buffer)
    if isinstance(step_size, Tensor):
        buffer.mul_(step_size.neg())
        torch._foreach_add_(params, buffer_views)
    else:
        torch._foreach_add_(params, buffer_views, alpha=-step_size)
    if refresh:
        _refresh_bases(tensors)


BlockMath = Callable[..., None]


# Graphs a compiled step may hold: one per block layout (shape, sides, second moment) and refresh
# flag. Dynamo's default of 8 per function would drop a model with more than 4 layouts to eager.
COMPILED_GRAPHS = 64


def compile_block_step(backend: Any = "inductor", fullgraph: bool = False) -> BlockMath:
    """``block_math`` under ``torch.compile``: one graph per block layout and refresh flag, the
    step size a tensor input (a learning-rate schedule does not recompile)."""
    compiled = torch.compile(block_math, backend=backend, fullgraph=fullgraph, dynamic=False)

    def run(*args: Any) -> None:
        with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS):
            compiled(*args)

    return run


@torch.no_grad()
def step_block(block: MatrixBlock, hyper: BlockHyper, math_fn: BlockMath = block_math) -> None:
    """One optimizer step of every matrix in ``block`` (``p.grad`` of each must be set).

    Weight decay is not part of it: the optimizer applies it to all of a group's parameters in
    one call after their steps. An empty block (a rank's share of a small block) does nothing.
    """
    if not block.params:
        return
    block.step += 1
    step_size: float | Tensor = hyper.step_size(block.step)
    if math_fn is not block_math:
        step_size = torch.tensor(step_size, dtype=block.buffer.dtype)  # a CPU scalar: no copy to a GPU
    math_fn(
        block.tensors,
        block.buffer,
        block.buffer_views,
        block.params,
        [param.grad for param in block.params],
        hyper.beta1,
        hyper.beta2,
        hyper.eps,
        hyper.factor_beta,
        hyper.factor_rule,
        step_size,
        block.step % hyper.precondition_frequency == 0,
    )
