"""A small GPT-style decoder in one readable file.

Pre-norm transformer blocks (LayerNorm → causal self-attention → residual, LayerNorm → MLP →
residual), learned positional embeddings, attention through ``scaled_dot_product_attention`` with
``is_causal=True``, optional tying of the input embedding and the output head.

``param_roles()`` tags every parameter as embedding, head, hidden matrix or 1-D vector so the
optimizer registry can route them (e.g. Muon and Kronecker-factored methods take only hidden
matrices; embeddings, heads and gains go to Adam-style updates).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The same strings as ``dykaf.baselines.roles`` (kept here so the model has no dependency on the library).
EMBEDDING, HEAD, HIDDEN, VECTOR = "embedding", "head", "hidden", "vector"


def roles_by_name(model: nn.Module, embeddings: tuple[str, ...]) -> dict[str, str]:
    """Parameter name → role for our own models: names under ``embeddings`` are embeddings,
    ``lm_head.`` the head, other matrices hidden, the rest vectors. With tied weights the shared
    matrix appears once, under its embedding name."""
    roles = {}
    for name, param in model.named_parameters():
        if name.startswith(embeddings):
            roles[name] = EMBEDDING
        elif name.startswith("lm_head."):
            roles[name] = HEAD
        elif param.ndim >= 2:
            roles[name] = HIDDEN
        else:
            roles[name] = VECTOR
    return roles


def set_dropout_rate(model: nn.Module, p: float) -> None:
    """Change the dropout rate everywhere, the attention's own (its ``dropout`` attribute, passed to
    ``scaled_dot_product_attention``) included."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif module is not model and type(getattr(module, "dropout", None)) in (int, float):
            module.dropout = p


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; stored in checkpoints so a run can be fine-tuned later."""

    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 128
    dropout: float = 0.0
    tie_weights: bool = False
    bias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head attention over past positions only."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (batch, length, self.n_head, width // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward layer, 4× expansion with GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only language model; ``forward(idx)`` returns logits of shape (batch, length, vocab)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2·n_layer) so the
        residual stream's variance does not grow with depth. Uses the global RNG: callers seed it."""
        for name, param in self.named_parameters():
            if param.ndim >= 2:
                std = 0.02
                if name.endswith("proj.weight"):
                    std = 0.02 / math.sqrt(2 * self.config.n_layer)
                nn.init.normal_(param, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.ones_(param)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.config.context:
            raise ValueError(f"sequence length {length} exceeds the context {self.config.context}")
        positions = torch.arange(length, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def param_roles(self) -> dict[str, str]:
        """Parameter name → role (embedding / head / hidden / vector) for optimizer routing."""
        return roles_by_name(self, ("wte.", "wpe."))

    def set_dropout(self, p: float) -> None:
        """Change the dropout rate everywhere (fine-tuning may use a different rate than pre-training)."""
        set_dropout_rate(self, p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
