"""Throughput you can compare across machines: model FLOPs per token and model FLOPs utilisation.

FLOPs per token follow the standard estimate (Kaplan et al. 2020; PaLM appendix B):
``6·N + 12·L·d·T`` for a forward and backward pass, where ``N`` counts the parameters that take part
in a matrix multiply (every matrix except an input embedding that is only looked up; a tied embedding
counts once, as the head), ``L`` the layers, ``d`` the width and ``T`` the context. The attention
term counts the full ``T × T`` score matrix, as the standard estimate does, even though a causal
kernel skips half of it.

MFU is achieved model FLOPs per second over the device's dense peak for the precision the run uses
(bf16 autocast on CUDA, fp32 elsewhere). Peaks come from a small table of known GPUs (vendor data
sheets, dense, no sparsity); an unknown device or a CPU has no peak and so no MFU.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Substring of torch.cuda.get_device_name() → (dense bf16 tensor peak, fp32 peak) in FLOP/s. Ordered:
# the first match wins, so more specific names come first.
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("GB200", 2.5e15, 80e12),
    ("B200", 2.25e15, 80e12),
    ("H200", 989.4e12, 66.9e12),
    ("H100 PCIe", 756.5e12, 51.2e12),
    ("H100 NVL", 835.5e12, 60.0e12),
    ("H100", 989.4e12, 66.9e12),
    ("H800", 989.4e12, 66.9e12),
    ("GH200", 989.4e12, 66.9e12),
    ("A100", 312e12, 19.5e12),
    ("A800", 312e12, 19.5e12),
    ("L40S", 362.05e12, 91.6e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 30.3e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165.2e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
)


def device_peak_flops(device_name: str, bf16: bool) -> float | None:
    """The dense peak of a known GPU for bf16 (tensor cores) or fp32; None when not in the table."""
    for key, bf16_peak, fp32_peak in GPU_PEAKS:
        if key in device_name:
            return bf16_peak if bf16 else fp32_peak
    return None


def _shape(model: nn.Module) -> tuple[int, int] | None:
    """(layers, width) from our models' config or a transformers config."""
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    layers = next((getattr(config, a) for a in ("n_layer", "num_hidden_layers") if hasattr(config, a)), None)
    width = next(
        (getattr(config, a) for a in ("d_model", "hidden_size", "n_embd") if hasattr(config, a)), None
    )
    if isinstance(layers, int) and isinstance(width, int):
        return layers, width
    return None


def matmul_parameters(model: nn.Module) -> int:
    """Parameters used in a matrix multiply: all but looked-up (untied) embedding tables and 1-D gains."""
    lookup_only = set()
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else getattr(model, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is not None:
        heads.add(id(head.weight))
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) not in heads:
            lookup_only.add(id(module.weight))
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or id(param) in lookup_only or param.ndim < 2:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def flops_per_token(model: nn.Module, context: int) -> float:
    """Training FLOPs per token: 6·N (matmul parameters) + 12·L·d·T (attention scores and values)."""
    shape = _shape(model)
    attention = 12 * shape[0] * shape[1] * context if shape is not None else 0
    return float(6 * matmul_parameters(model) + attention)


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None) -> float | None:
    """Achieved model FLOPs over the device peak (a fraction), or None without a known peak."""
    if peak is None or peak <= 0 or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_tok / peak
