"""``task.kind: classify`` — sequence classification (single texts or pairs) with a pretrained encoder
or decoder through ``AutoModelForSequenceClassification``, fully or with LoRA (the classification
head is always trained).

Each evaluation logs the validation loss plus accuracy, macro-F1 and Matthews correlation
(``worker.lm.scores``). Labels may be integers ``0..K-1`` or strings (mapped to ids in sorted order,
taken from the training split); anything else ends the run with a message saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.jobs.paths import confine_path
from server.jobs.spec import BUILTIN_PREFIX, ClassifySpec, LoraSpec, TaskSpec, looks_like_local_path
from worker.lm.builtin import Codec, builtin_config, byte_codec, hf_codec
from worker.lm.examples import ExampleBatches, fixed_batches, load_split, require_fields
from worker.lm.hf import param_roles
from worker.lm.model import HEAD
from worker.lm.scores import classification_scores

# Names of the classification heads in transformers models (BERT/DeBERTa: classifier, GPT-2/LLaMA:
# score); peft's SEQ_CLS task type keeps exactly these trainable next to the adapters.
HEAD_NAMES = ("classifier", "score")


@dataclass
class SupervisedParts:
    """What a classify/instruct task hands the runner beyond the model."""

    model: nn.Module
    codec: Codec
    train_batches: Any
    val_batches: list[Any]
    loss_fn: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]
    eval_metrics: Callable[[nn.Module, torch.device], dict[str, float]]
    roles: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


def label_ids(
    train: list[Any], val: list[Any], num_labels: int | None
) -> tuple[list[int], list[int], list[str]]:
    """Map raw labels to ids: integers stay (checked against ``0..K-1``), strings are sorted names."""
    every = train + val
    if all(isinstance(v, int) and not isinstance(v, bool) for v in every):
        k = num_labels or max(every) + 1
        bad = [v for v in every if not 0 <= v < k]
        if bad:
            raise ValueError(f"integer labels must lie in 0..{k - 1}; found {bad[0]}")
        if k < 2:
            raise ValueError("classification needs at least two labels")
        return list(train), list(val), [str(i) for i in range(k)]
    if all(isinstance(v, str) for v in every):
        names = sorted(set(train))
        unseen = sorted(set(val) - set(names))
        if unseen:
            raise ValueError(f"validation labels not in the training split: {unseen[:5]}")
        if num_labels is not None and num_labels != len(names):
            raise ValueError(f"num_labels is {num_labels} but the training split has {len(names)} labels")
        if len(names) < 2:
            raise ValueError("classification needs at least two labels")
        index = {name: i for i, name in enumerate(names)}
        return [index[v] for v in train], [index[v] for v in val], names
    kinds = sorted({type(v).__name__ for v in every if not isinstance(v, int | str) or isinstance(v, bool)})
    raise ValueError(f"labels must be integers or strings, found {', '.join(kinds) or 'a mix'}")


def load_classifier(reference: str, num_labels: int, context: int) -> tuple[nn.Module, Codec, str]:
    """(model, codec, origin) for ``finetune.model`` with a freshly initialised head of ``num_labels``."""
    if reference.startswith(BUILTIN_PREFIX):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_config(builtin_config(reference, context, num_labels))
        return model, byte_codec(), "hf"
    source = reference
    if looks_like_local_path(reference):
        path = confine_path(reference)
        if not path.exists():
            raise FileNotFoundError(f"model path {reference!r} does not exist")
        if path.suffix == ".pt" or ((path / "model.pt").exists() and not (path / "config.json").exists()):
            raise ValueError(
                f"{reference} is a dykaf-lab GPT export, which has no sequence-classification head; "
                "use kind 'finetune' or 'instruct' with it, or a Hugging Face model for 'classify'"
            )
        source = str(path)
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, dtype=torch.float32
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ValueError(
                f"model {reference!r} ({config.model_type}) has no sequence-classification head in "
                "transformers; choose an encoder (BERT, DeBERTa, RoBERTa) or a decoder that has one"
            ) from None
        raise
    codec = hf_codec(AutoTokenizer.from_pretrained(source))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = codec.pad_id
    return model, codec, "hf"


def apply_classifier_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """LoRA adapters plus a trainable head (peft's ``SEQ_CLS`` keeps classifier/score trainable)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, config)


def classifier_roles(model: nn.Module) -> dict[str, str]:
    """``hf.param_roles`` with the classification head's matrices marked as the head."""
    roles = param_roles(model)
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.ndim >= 2 and "lora_" not in name and any(h in parts for h in HEAD_NAMES):
            roles[name] = HEAD
    return roles


def _collate(
    pad_id: int,
) -> Callable[[list[tuple[list[int], int]]], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    def collate(items: list[tuple[list[int], int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask}, labels

    return collate


def classify_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), labels)


def _texts(records: list[dict[str, Any]], spec: ClassifySpec) -> list[tuple[str, str | None]]:
    out = []
    for record in records:
        text = record[spec.text_field]
        pair = record[spec.text_pair_field] if spec.text_pair_field else None
        out.append((str(text), None if pair is None else str(pair)))
    return out


def build_classify(
    spec: TaskSpec, seed: int, seeded: Callable[[int, Callable[[], nn.Module]], nn.Module]
) -> SupervisedParts:
    """Data, model (initialised under ``seeded``) and the runner's hooks for a classification task."""
    cls = spec.classify
    assert cls is not None and spec.finetune is not None
    fields = {
        "text_field": cls.text_field,
        "text_pair_field": cls.text_pair_field,
        "label_field": cls.label_field,
    }
    train = load_split(cls, "classify", "train")
    val = load_split(cls, "classify", "validation")
    require_fields(train, fields, cls.train_split)
    require_fields(val, fields, cls.validation_split)
    train_y, val_y, names = label_ids(
        [r[cls.label_field] for r in train], [r[cls.label_field] for r in val], cls.num_labels
    )
    model_ref = spec.finetune.model
    model, codec, _origin = seeded(seed, lambda: load_classifier(model_ref, len(names), spec.context))  # type: ignore[arg-type,return-value]
    lora = spec.finetune.lora
    if lora is not None:
        base = model
        model = seeded(seed, lambda: apply_classifier_lora(base, lora))
    train_items = [
        (codec.pair(a, b, spec.context), y) for (a, b), y in zip(_texts(train, cls), train_y, strict=True)
    ]
    val_items = [
        (codec.pair(a, b, spec.context), y) for (a, b), y in zip(_texts(val, cls), val_y, strict=True)
    ]
    collate = _collate(codec.pad_id)
    val_batches = fixed_batches(val_items, collate, spec.batch_size)

    @torch.no_grad()
    def eval_metrics(net: nn.Module, device: torch.device) -> dict[str, float]:
        predictions: list[int] = []
        for inputs, _ in val_batches:
            logits = net(**{k: v.to(device) for k, v in inputs.items()}).logits
            predictions.extend(logits.argmax(-1).tolist())
        scores = classification_scores(val_y, predictions)
        return {f"val_{k}": v for k, v in scores.items()}

    return SupervisedParts(
        model=model,
        codec=codec,
        train_batches=ExampleBatches(train_items, collate, spec.batch_size, seed),
        val_batches=val_batches,
        loss_fn=classify_loss,
        eval_metrics=eval_metrics,
        roles=classifier_roles(model),
        info={"labels": names, "train_examples": len(train_items), "val_examples": len(val_items)},
    )
