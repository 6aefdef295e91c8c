"""A LLaMA-style decoder in one readable file: the architecture the optimizer literature uses.

Differences from the GPT in ``model.py``: RMSNorm instead of LayerNorm, rotary position embeddings
on queries and keys instead of a learned position table, a SwiGLU feed-forward layer
(``down(silu(gate(x)) * up(x))``) instead of GELU, no biases anywhere, untied embeddings by default.
Attention goes through ``scaled_dot_product_attention`` (flash attention on GPUs).

Rotary embedding convention: the "rotate half" form used by the Hugging Face LLaMA code (the head
dimension is split into two halves that form the real and imaginary parts), so the pair rotated by
frequency ``θ_i = base^(-2i/d)`` is (x[i], x[i + d/2]).

``param_roles()`` declares every parameter's role (embedding, head, hidden matrix, 1-D vector) so the
optimizer registry routes it (see ``worker.lm.model``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.lm.model import roles_by_name, set_dropout_rate


def swiglu_hidden(d_model: int, multiple_of: int = 256) -> int:
    """LLaMA's feed-forward width: 2/3 of 4·d (same parameters as a 4× GELU MLP), rounded up."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of the model; stored in exports so a run can be fine-tuned later."""

    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 128
    ffn_hidden: int | None = None  # None: swiglu_hidden(d_model)
    dropout: float = 0.0
    tie_weights: bool = False
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or swiglu_hidden(self.d_model)

    def to_dict(self) -> dict:
        return asdict(self)


def rotary_tables(
    head_dim: int, length: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position · θ_i, each (length, head_dim) with the halves repeated (computed in
    float64, returned in ``dtype``)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + d/2]) pair of ``x`` (…, length, head_dim) by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with rotary embeddings on queries and keys."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.n_head, width // self.n_head)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    """Gated feed-forward layer: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm residual block: RMSNorm → attention, RMSNorm → SwiGLU."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.hidden)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(nn.Module):
    """Decoder-only language model; ``forward(idx)`` returns logits of shape (batch, length, vocab)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if config.d_model % config.n_head or (config.d_model // config.n_head) % 2:
            raise ValueError("d_model / n_head must be an even integer for rotary embeddings")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(config.d_model // config.n_head, config.context, config.rope_base)
        # Not parameters and not saved: recomputed from the config, moved with the model.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) matrices, output projections of each residual branch scaled by 1/sqrt(2·n_layer),
        unit norm gains. Uses the global RNG: callers seed it."""
        for name, param in self.named_parameters():
            if param.ndim >= 2:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std = 0.02 / math.sqrt(2 * self.config.n_layer)
                nn.init.normal_(param, mean=0.0, std=std)
            else:
                nn.init.ones_(param)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.config.context:
            raise ValueError(f"sequence length {length} exceeds the context {self.config.context}")
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))

    def param_roles(self) -> dict[str, str]:
        """Parameter name → role; with tied weights the shared matrix is the embedding."""
        return roles_by_name(self, ("embed.",))

    def set_dropout(self, p: float) -> None:
        set_dropout_rate(self, p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
