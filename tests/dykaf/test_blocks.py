"""The batched engine: blocks of same-shape matrices step like matrices stepped one by one.

Parity is checked against blocks of one matrix (a separate optimizer per parameter: the per-matrix
path), against the pre-batching engine's own trajectory from a checkpoint it wrote, and the factor
rules against the float64 oracle in ``test_kronecker.py``.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dykaf import SOAP, DyKAF
from dykaf.blocks import BlockHyper, contiguous_shares, step_block

DATA = Path(__file__).with_name("data")


def _params(
    shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in shapes]


def _grads(params: list[nn.Parameter], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(steps)]


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


# A GPT block's shapes (qkv, attention out, MLP in, MLP out) twice over, a conv weight shaped like
# the 3×8 matrices, and a vector: blocks of 2 and 3 plus the Adam path.
STACK = [(12, 4), (4, 4), (16, 4), (4, 16)] * 2 + [(4, 2, 2, 2), (4, 8), (4, 8), (4,)]


@pytest.mark.parametrize("rule", ["parallel", "sequential", "ema"])
@pytest.mark.parametrize("second_moment", ["full", "rank1"])
def test_block_step_equals_per_matrix_step(rule: str, second_moment: str) -> None:
    """One optimizer (blocks of 2–3) against one optimizer per parameter (blocks of 1), float32."""
    params = _params(STACK)
    alone = [nn.Parameter(p.detach().clone()) for p in params]
    kw = {"lr": 1e-2, "factor_rule": rule, "second_moment": second_moment, "precondition_frequency": 3}
    batched = DyKAF(params, **kw)
    singles = [DyKAF([p], **kw) for p in alone]
    grads = _grads(params, 11)
    _run(batched, params, grads)
    for opt, p, column in zip(singles, alone, zip(*grads, strict=True), strict=True):
        _run(opt, [p], [[g] for g in column])
    assert max(len(b) for b in batched._blocks.values()) == 3, "the equal shapes must share a block"
    for a, b, single in zip(params, alone, singles, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
        for key, value in batched.state[a].items():
            # Bases are compared through the parameters: equal up to the signs of their columns.
            if torch.is_tensor(value) and not key.endswith("basis"):
                torch.testing.assert_close(value, single.state[b][key], rtol=2e-4, atol=1e-6)


def test_checkpoint_of_the_per_matrix_engine_resumes_on_its_trajectory() -> None:
    """A checkpoint written by the engine before batching (``data/make_pre_block_checkpoint.py``)
    loads, and six more steps land where that engine went (to float32 rounding)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_ckpt", DATA / "make_pre_block_checkpoint.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)  # type: ignore[union-attr]
    saved = torch.load(DATA / "pre_block_checkpoint.pt")
    params = make.make_params()
    with torch.no_grad():
        for p, value in zip(params, saved["params_at_6"], strict=True):
            p.copy_(value)
    opt = DyKAF(make.groups(params), lr=1e-2, precondition_frequency=4)
    opt.load_state_dict(saved["optimizer"])
    for step_grads in make.make_grads(params, 12)[6:]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
    for p, want in zip(params, saved["params_at_12"], strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
    # The public per-parameter format is unchanged: same keys, same shapes, steps as ints.
    state = opt.state_dict()["state"]
    for index, old in saved["optimizer"]["state"].items():
        assert set(state[index]) == set(old)
        for key, value in old.items():
            if torch.is_tensor(value):
                assert state[index][key].shape == value.shape, (index, key)
            elif key == "step":
                assert state[index][key] == value + 6


def _stepped_block(count: int, rule: str = "parallel") -> tuple[DyKAF, list[nn.Parameter]]:
    params = _params([(6, 4)] * count)
    opt = DyKAF(params, lr=1e-2, factor_rule=rule, precondition_frequency=2)
    _run(opt, params, _grads(params, 3))
    return opt, params


def test_contiguous_shares_split_a_block_of_twelve_among_eight_ranks() -> None:
    shares = contiguous_shares(12, 8)
    assert shares == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 10), (10, 11), (11, 12)]
    assert contiguous_shares(3, 8)[:3] == [(0, 1), (1, 2), (2, 3)] and contiguous_shares(3, 8)[3] == (3, 3)


@pytest.mark.parametrize("rule", ["parallel", "ema"])
def test_stepping_the_slices_of_a_block_is_stepping_the_block(rule: str) -> None:
    """Twelve matrices: the whole block once, or eight ranks' contiguous slices one after another."""
    opt, params = _stepped_block(12, rule)
    (block,) = opt._blocks.values()
    hyper = BlockHyper(1e-2, 0.95, 0.95, 1e-8, 0.95, rule, 2)  # step 4 of 2: includes a refresh
    grads = _grads(params, 1, seed=7)[0]
    twin = copy.deepcopy((block, params))
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    step_block(block, hyper)
    twin_block, twin_params = twin
    for p, g in zip(twin_params, grads, strict=True):
        p.grad = g
    for start, stop in contiguous_shares(len(twin_block), 8):
        step_block(twin_block.slice(start, stop), hyper)
    for a, b in zip(params, twin_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for key, value in block.tensors.items():
        torch.testing.assert_close(value, twin_block.tensors[key], rtol=1e-5, atol=1e-7)


def test_per_parameter_state_is_a_view_of_the_block_and_stays_current() -> None:
    opt, params = _stepped_block(3)
    (block,) = opt._blocks.values()
    for index, p in enumerate(params):
        state = opt.state[p]
        assert state["left"].data_ptr() == block.tensors["left"][index].data_ptr()
        assert state["step"] == block.step == 2
        own = opt.preconditioner_state(p)
        assert own.updates == 3 and torch.equal(own.left, block.tensors["left"][index])
    before = opt.state[params[1]]["left"].clone()
    _run(opt, params, _grads(params, 1, seed=9))
    assert not torch.equal(opt.state[params[1]]["left"], before), "the view must follow the block"


def test_saved_state_is_not_inflated_by_the_stacked_storage() -> None:
    """torch.save keeps each block's storage once: the file is the size of the state, not b× it."""
    opt, _ = _stepped_block(8)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    state_bytes = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    assert state_bytes < buffer.getbuffer().nbytes < 1.5 * state_bytes + 20_000


def test_parameter_without_gradient_waits_and_rejoins_in_its_own_block() -> None:
    """A parameter skipped for a step keeps its state and step count; it is then one step behind
    its shape-mates, so it steps as its own block, and matches a parameter stepped alone."""
    params = _params([(6, 4)] * 3)
    alone = nn.Parameter(params[2].detach().clone())
    opt = DyKAF(params, lr=1e-2, precondition_frequency=3)
    ref = DyKAF([alone], lr=1e-2, precondition_frequency=3)
    grads = _grads(params, 8)
    for step, step_grads in enumerate(grads):
        skip = step == 3
        step_grads = [g if (i < 2 or not skip) else None for i, g in enumerate(step_grads)]
        _run(opt, params, [step_grads])
        if not skip:
            _run(ref, [alone], [[step_grads[2]]])
        if skip:
            assert opt.state[params[2]]["step"] == 2 and opt.state[params[0]]["step"] == 3
    assert opt.state[params[2]]["step"] == 6 and opt.state[params[0]]["step"] == 7
    assert sorted(len(b) for b in opt._blocks.values()) == [1, 2]
    torch.testing.assert_close(params[2], alone, rtol=2e-5, atol=2e-6)


def test_parameter_added_with_add_param_group_is_initialised_and_stepped() -> None:
    first = _params([(6, 4)] * 2)
    late = _params([(6, 4), (5,)], seed=3)
    late_alone = [nn.Parameter(p.detach().clone()) for p in late]
    opt = DyKAF(first, lr=1e-2, precondition_frequency=2)
    ref = DyKAF(late_alone, lr=1e-2, precondition_frequency=2)
    _run(opt, first, _grads(first, 3))
    opt.add_param_group({"params": late})
    everything = first + late
    for step_grads in _grads(everything, 5, seed=4):
        _run(opt, everything, [step_grads])
        _run(ref, late_alone, [step_grads[2:]])
    assert opt.state[late[0]]["step"] == 4 and opt.state[first[0]]["step"] == 7
    for a, b in zip(late, late_alone, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# Ops that read a tensor's value on the host (each one waits for the device on a GPU).
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"})


class _SyncWatch(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [DyKAF, SOAP, lambda p, **k: DyKAF(p, second_moment="rank1", **k)])
def test_no_host_synchronisation_after_the_first_step(make) -> None:  # type: ignore[no-untyped-def]
    params = _params(STACK)
    opt = make(params, lr=1e-2, precondition_frequency=3)
    grads = _grads(params, 8)
    _run(opt, params, grads[:1])
    with _SyncWatch() as watch:
        _run(opt, params, grads[1:])  # two refreshes and a block (re)build included
    assert watch.syncs == []
    # The watch does see a synchronisation: the first step (zero-gradient test, eigh checks) has them.
    fresh = make(_params(STACK), lr=1e-2)
    with _SyncWatch() as watch:
        _run(fresh, list(fresh.param_groups[0]["params"]), grads[:1])
    assert watch.syncs


def test_block_step_compiles_to_one_graph_per_layout_and_matches_eager() -> None:
    """``fullgraph=True`` fails on any graph break (a host read would be one); a recorded graph per
    refresh flag and no more shows that changing step sizes do not recompile. The backend runs the
    captured graph as it is, without generating code (seconds instead of minutes on this CPU)."""
    from dykaf import blocks

    graphs = []

    def recording_backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    params = _params([(6, 4)] * 2)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    eager = DyKAF(params, lr=1e-2, init="eps", precondition_frequency=2)
    compiled = DyKAF(twins, lr=1e-2, init="eps", precondition_frequency=2)
    compiled._math = blocks.compile_block_step(backend=recording_backend, fullgraph=True)
    grads = _grads(params, 7)
    _run(eager, params, grads)
    torch._dynamo.reset()
    _run(compiled, twins, grads)
    assert len(graphs) == 2, f"{len(graphs)} graphs: expected one without and one with a refresh"
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["ema", "parallel", "sequential"])
def test_a_shadow_fed_a_block_tracks_each_layer_like_its_own_shadow(rule: str) -> None:
    """The diagnostics' shadows run the optimizer's batched rules: a block of three layers'
    gradients gives the three factor pairs that three single-layer shadows hold."""
    from dykaf.fisher.shadow import ShadowFactors

    gen = torch.Generator().manual_seed(11)
    stream = [torch.randn(3, 7, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    block, singles = ShadowFactors(rule), [ShadowFactors(rule) for _ in range(3)]
    for grads in stream:
        block.update(grads, 0.9)
        for i, single in enumerate(singles):
            single.update(grads[i], 0.9)
    assert block.steps == singles[0].steps and block.left.shape == (3, 7, 7)
    for i, single in enumerate(singles):
        torch.testing.assert_close(block.left[i], single.left, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.right[i], single.right, rtol=1e-10, atol=1e-12)


def test_compile_step_is_off_by_default_and_validated() -> None:
    from dykaf import blocks

    assert DyKAF(_params([(4, 3)]))._math is blocks.block_math
    with pytest.raises(ValueError, match="compile_step must be true or false"):
        DyKAF(_params([(4, 3)]), compile_step="yes")  # type: ignore[arg-type]
