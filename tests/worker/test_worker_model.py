"""The GPT model: shapes, gradients, causality, parameter roles, weight tying."""

from __future__ import annotations

import torch

from worker.lm.model import EMBEDDING, GPT, HEAD, HIDDEN, VECTOR, GPTConfig


def _model(**kw: object) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, context=12, **kw)  # type: ignore[arg-type]
    return GPT(config)


def test_forward_backward_shapes() -> None:
    model = _model()
    idx = torch.randint(0, 50, (3, 12))
    logits = model(idx)
    assert logits.shape == (3, 12, 50)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_changing_a_future_token_leaves_earlier_logits_unchanged() -> None:
    model = _model().eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 50
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_longer_than_context_is_rejected() -> None:
    model = _model()
    try:
        model(torch.zeros(1, 13, dtype=torch.long))
    except ValueError as exc:
        assert "context" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_param_roles_cover_every_parameter() -> None:
    model = _model()
    roles = model.param_roles()
    assert set(roles) == {n for n, _ in model.named_parameters()}
    assert roles["wte.weight"] == EMBEDDING and roles["wpe.weight"] == EMBEDDING
    assert roles["lm_head.weight"] == HEAD
    assert roles["blocks.0.attn.qkv.weight"] == HIDDEN
    assert roles["blocks.1.ln2.weight"] == VECTOR
    hidden = [n for n, r in roles.items() if r == HIDDEN]
    assert len(hidden) == 2 * 4  # qkv, attn proj, mlp fc, mlp proj per block


def test_tied_weights_share_one_parameter() -> None:
    model = _model(tie_weights=True)
    assert model.lm_head.weight is model.wte.weight
    roles = model.param_roles()
    assert "lm_head.weight" not in roles and roles["wte.weight"] == EMBEDDING
    assert model.num_parameters() == _model().num_parameters() - 50 * 16


def test_same_seed_same_init() -> None:
    a, b = _model(), _model()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
