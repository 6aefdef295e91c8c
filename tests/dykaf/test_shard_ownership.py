"""Who owns which parameter in a sharded step, and what each parameter is taken to cost."""

from __future__ import annotations

import math

import pytest
import torch

from dykaf.baselines.registry import shard_cost
from dykaf.distributed import assign_owners
from dykaf.options import DEFAULTS


def test_longest_first_to_the_least_loaded_rank_worked_by_hand() -> None:
    # 5→r0, 4→r1, 3→r1 (loads 5, 7), 3→r0 (8, 7), 2→r1 (8, 9).
    assert assign_owners([5, 4, 3, 3, 2], 2) == [0, 1, 1, 0, 1]
    # Equal costs go in index order, equal loads to the lowest rank.
    assert assign_owners([1, 1, 1, 1], 2) == [0, 1, 0, 1]
    assert assign_owners([1, 1, 1], 1) == [0, 0, 0]


def test_every_index_is_owned_once_pinned_ones_where_pinned_and_the_map_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    costs = [float(c) for c in torch.randint(1, 1000, (60,), generator=gen)]
    pinned = {3: 2, 17: 0, 40: 2}
    owners = assign_owners(costs, 3, pinned)
    assert len(owners) == len(costs) and set(owners) == {0, 1, 2}
    assert all(owners[i] == r for i, r in pinned.items())
    assert assign_owners(list(costs), 3, dict(reversed(pinned.items()))) == owners
    # Pinned costs count: the rest is balanced around them.
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs)


def test_a_pinned_heavy_parameter_pushes_the_others_away() -> None:
    assert assign_owners([10, 1, 1, 1], 2, {0: 0}) == [0, 1, 1, 1]
    assert assign_owners([10, 1, 1, 1], 2, {0: 1}) == [1, 0, 0, 0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1.0], 0), "world_size must be an integer >= 1"),
        (([1.0, -1.0], 2), r"costs\[1\] must be finite and >= 0"),
        (([1.0, math.nan], 2), r"costs\[1\] must be finite"),
        (([1.0], 2, {1: 0}), "pinned index 1 is out of range for 1 costs"),
        (([1.0, 2.0], 2, {0: 2}), "pinned index 0 names rank 2, outside 0..1"),
    ],
)
def test_bad_arguments_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_owners(*args)


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def test_costs_follow_each_optimizers_routing() -> None:
    """Each figure computed by hand from the shapes and the entry's rule."""
    dykaf = shard_cost("dykaf", {"max_precond_dim": 1000})
    assert (
        dykaf("h.0.mlp.c_fc.weight", _meta(3072, 768)) == 3072 * 768 * 768
    )  # rows beyond 1000: no left factor
    assert dykaf("h.0.attn.c_proj.weight", _meta(768, 768)) == 768 * 768 * 1536
    assert dykaf("h.0.conv.weight", _meta(8, 4, 3)) == 8 * 12 * 20  # flattened to 8 × 12
    assert dykaf("wte.weight", _meta(5000, 2000)) == 5000 * 2000  # no factor at all
    assert dykaf("h.0.ln_1.weight", _meta(768)) == 768  # plain Adam
    assert shard_cost("soap", {"precondition_1d": True})("ln.weight", _meta(768)) == 768 * (1 + 768)
    muon = shard_cost("muon", {})
    assert muon("h.0.mlp.c_fc.weight", _meta(3072, 768)) == 3072 * 768 * 768
    assert muon("wte.weight", _meta(50257, 768)) == 50257 * 768  # an embedding runs AdamW
    assert muon("h.0.ln_1.weight", _meta(768)) == 768
    # Explicit roles win over the names.
    assert shard_cost("muon", {}, roles={"w": "head"})("w", _meta(64, 32)) == 64 * 32
    shampoo = shard_cost("shampoo", {"block_size": 512, "max_precond_dim": 4096})
    assert shampoo("h.0.mlp.c_fc.weight", _meta(3072, 768)) == 3072 * 768 * (512 + 512)  # blocked sides
    assert shampoo("h.0.attn.c_proj.weight", _meta(256, 128)) == 256 * 128 * (256 + 128)
    assert shampoo("wte.weight", _meta(50257, 768)) == 50257 * 768  # too large: AdamW
    assert shard_cost("adamw", {})("h.0.mlp.c_fc.weight", _meta(3072, 768)) == 3072 * 768
    assert shard_cost("adafactor", {})("h.0.mlp.c_fc.weight", _meta(3072, 768)) == 3072 * 768
    with pytest.raises(ValueError, match="max_precond_dim"):
        shard_cost("dykaf", {"max_precond_dim": -1})


def gpt2_small() -> list[tuple[str, torch.Tensor]]:
    """GPT-2 small's trainable parameters (12 layers, d = 768, vocab 50257, context 1024, the head
    tied to the token embedding), in ``nn.Linear`` layout (out × in)."""
    d = 768
    named = [("wte.weight", _meta(50257, d)), ("wpe.weight", _meta(1024, d))]
    for layer in range(12):
        p = f"h.{layer}."
        named += [
            (p + "ln_1.weight", _meta(d)),
            (p + "ln_1.bias", _meta(d)),
            (p + "attn.c_attn.weight", _meta(3 * d, d)),
            (p + "attn.c_attn.bias", _meta(3 * d)),
            (p + "attn.c_proj.weight", _meta(d, d)),
            (p + "attn.c_proj.bias", _meta(d)),
            (p + "ln_2.weight", _meta(d)),
            (p + "ln_2.bias", _meta(d)),
            (p + "mlp.c_fc.weight", _meta(4 * d, d)),
            (p + "mlp.c_fc.bias", _meta(4 * d)),
            (p + "mlp.c_proj.weight", _meta(d, 4 * d)),
            (p + "mlp.c_proj.bias", _meta(d)),
        ]
    return [*named, ("ln_f.weight", _meta(d)), ("ln_f.bias", _meta(d))]


@pytest.mark.parametrize("world_size", [2, 4])
def test_gpt2_small_dykaf_costs_are_balanced_within_25_percent(world_size: int) -> None:
    """Asserted: on GPT-2 small with DyKAF's default max_precond_dim, the most loaded rank's summed
    DyKAF cost is at most 1.25 × the least loaded one's, and every rank owns parameters."""
    assert DEFAULTS["max_precond_dim"] == 10000  # the vocabulary side of wte gets no factor
    named = gpt2_small()
    cost = shard_cost("dykaf", {})
    costs = [cost(name, param) for name, param in named]
    owners = assign_owners(costs, world_size)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world_size)]
    assert max(loads) <= 1.25 * min(loads), loads
    assert sorted(set(owners)) == list(range(world_size))
