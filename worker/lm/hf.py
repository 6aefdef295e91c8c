"""Pretrained starting points for fine-tuning: Hugging Face causal LMs (local directory or hub id),
LoRA adapters through ``peft``, and model exports of our own earlier pre-training runs.

Loading goes through the real ``from_pretrained`` path in every case; without network access a hub id
simply fails with the library's own error, which the runner reports as the run's failure reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.jobs.paths import confine_path
from server.jobs.spec import LoraSpec, looks_like_local_path
from worker.lm.llama import Llama, LlamaConfig
from worker.lm.model import EMBEDDING, GPT, HEAD, HIDDEN, VECTOR, GPTConfig
from worker.lm.tokenization import HFTokenizer, TextTokenizer, tokenizer_from_dict
from worker.training.checkpoint import atomic_torch_save

EXPORT_FORMAT = "dykaf-lab/gpt-v1"
EXPORT_NAME = "model.pt"


OUR_MODELS = (GPT, Llama)


def save_gpt_export(path: Path, model: GPT | Llama, tokenizer: TextTokenizer) -> None:
    """Write a self-contained model file (config, weights, tokenizer) that ``finetune.model`` accepts."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": EXPORT_FORMAT,
        "arch": "llama" if isinstance(model, Llama) else "gpt",
        "config": model.config.to_dict(),
        "state_dict": state,
        "tokenizer": tokenizer.to_dict(),
    }
    atomic_torch_save(payload, path)


def _export_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".pt":
        return path
    if path.is_dir() and (path / EXPORT_NAME).is_file() and not (path / "config.json").exists():
        return path / EXPORT_NAME
    return None


def load_gpt_export(path: Path) -> tuple[GPT | Llama, TextTokenizer]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a model export of a dykaf-lab pre-training run")
    model: GPT | Llama
    if payload.get("arch") == "llama":
        model = Llama(LlamaConfig(**payload["config"]))
    else:
        model = GPT(GPTConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model, tokenizer_from_dict(payload["tokenizer"])


def load_hf_causal_lm(source: str) -> tuple[nn.Module, TextTokenizer]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` in float32 (autocast handles reduced precision)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, HFTokenizer(tokenizer)


def load_pretrained(reference: str) -> tuple[nn.Module, TextTokenizer, str]:
    """Resolve ``finetune.model``: (model, tokenizer, origin); origin is gpt, llama or hf."""
    if looks_like_local_path(reference):
        path = confine_path(reference)
        if not path.exists():
            raise FileNotFoundError(f"model path {reference!r} does not exist")
        export = _export_file(path)
        if export is not None:
            model, tokenizer = load_gpt_export(export)
            return model, tokenizer, "llama" if isinstance(model, Llama) else "gpt"
        model, tokenizer = load_hf_causal_lm(str(path))
        return model, tokenizer, "hf"
    model, tokenizer = load_hf_causal_lm(reference)
    return model, tokenizer, "hf"


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the pretrained model accepts, when its config says."""
    if isinstance(model, OUR_MODELS):
        return model.config.context
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def apply_lora(model: nn.Module, lora: LoraSpec, origin: str) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; everything else is frozen by peft."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    if targets is None and origin == "gpt":
        targets = ["qkv"]
    elif targets is None and origin == "llama":
        targets = ["q_proj", "v_proj"]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM" if origin == "hf" else None,
    )
    return get_peft_model(model, config)


def param_roles(model: nn.Module) -> dict[str, str]:
    """Role of every parameter of a (possibly peft-wrapped) model, keyed by its name in ``model``.

    Roles follow the modules, not name patterns: the weights of embedding modules are embeddings,
    the output projection is the head (an embedding when tied), LoRA and other matrices are hidden,
    everything 1-D is a vector.
    """
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    by_id: dict[int, str] = {}
    if isinstance(base, OUR_MODELS):
        named = dict(base.named_parameters())
        by_id = {id(named[name]): role for name, role in base.param_roles().items()}
    else:
        get_out = getattr(base, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        if head is not None and getattr(head, "weight", None) is not None:
            by_id[id(head.weight)] = HEAD
        for module in base.modules():
            if isinstance(module, nn.Embedding):
                by_id[id(module.weight)] = EMBEDDING
    roles = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            roles[name] = HIDDEN
        elif id(param) in by_id:
            roles[name] = by_id[id(param)]
        else:
            roles[name] = HIDDEN if param.ndim >= 2 else VECTOR
    return roles


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits for our GPT (plain tensor output) and for transformers models (``.logits``)."""
    output = model(inputs) if _is_gpt(model) else model(input_ids=inputs)
    return output if isinstance(output, torch.Tensor) else output.logits


def _is_gpt(model: nn.Module) -> bool:
    """One of our models, seen through torch.compile's, DDP's and peft's wrappers."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, OUR_MODELS)
