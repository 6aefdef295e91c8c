"""``task.kind: instruct`` — supervised fine-tuning of a causal LM on prompt/answer pairs.

The loss covers the answer tokens (and the end-of-text after them) only: the prompt's positions
carry the ignore label, so the model is not trained to reproduce questions. Each evaluation also
generates greedily for up to ``max_new_tokens`` on the first ``eval_examples`` validation prompts,
extracts the final answer (``worker.lm.scores.extract_answer``) and logs the exact-match share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.jobs.spec import BUILTIN_PREFIX, InstructSpec, TaskSpec
from worker.lm.builtin import Codec, builtin_config, byte_codec, hf_codec, text_tokenizer_codec
from worker.lm.classify import SupervisedParts
from worker.lm.examples import ExampleBatches, fixed_batches, load_split, require_fields
from worker.lm.hf import apply_lora, load_pretrained, logits_of, param_roles
from worker.lm.scores import exact_match

IGNORE = -100


def sft_example(codec: Codec, prompt: str, answer: str, context: int) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one pair for next-token training: targets are the inputs shifted
    by one, with every position that would predict a prompt token set to ``IGNORE``. Truncated to
    ``context`` positions (the answer's end is what a too-long example loses)."""
    prompt_ids = codec.encode(prompt)
    if codec.bos_id is not None:
        prompt_ids = [codec.bos_id, *prompt_ids]
    answer_ids = [*codec.encode(answer), codec.eos_id]
    ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    return ids[:-1][:context], labels[1:][:context]


def load_causal_lm(reference: str, context: int) -> tuple[nn.Module, Codec, str]:
    if reference.startswith(BUILTIN_PREFIX):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(builtin_config(reference, context)), byte_codec(), "hf"
    model, tokenizer, origin = load_pretrained(reference)
    if origin == "hf":
        return model, hf_codec(tokenizer._tok), origin
    return model, text_tokenizer_codec(tokenizer), origin


def _collate(
    pad_id: int,
) -> Callable[[list[tuple[list[int], list[int]]]], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    def collate(items: list[tuple[list[int], list[int]]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for row, (ids, labels) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            targets[row, : len(labels)] = torch.tensor(labels)
        return {"input_ids": input_ids, "attention_mask": mask}, targets

    return collate


def _forward(model: nn.Module, origin: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if origin == "gpt":  # our GPT is causal and right padding never reaches a real token
        return logits_of(model, inputs["input_ids"])
    return model(**inputs).logits


def sft_loss(origin: str) -> Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    def loss(model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits = _forward(model, origin, inputs)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
        )

    return loss


@torch.no_grad()
def greedy(
    model: nn.Module, origin: str, codec: Codec, prompt_ids: list[int], limit: int, context: int
) -> str:
    """Greedy continuation of one prompt up to ``limit`` tokens or the end-of-text token."""
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(limit):
        window = torch.tensor([ids[-context:]], device=device)
        logits = _forward(model, origin, {"input_ids": window, "attention_mask": torch.ones_like(window)})
        token = int(logits[0, -1].argmax())
        if token == codec.eos_id:
            break
        out.append(token)
        ids.append(token)
    return codec.decode(out)


def build_instruct(
    spec: TaskSpec, seed: int, seeded: Callable[[int, Callable[[], Any]], Any]
) -> SupervisedParts:
    """Data, model and the runner's hooks for an instruct task."""
    ins: InstructSpec | None = spec.instruct
    assert ins is not None and spec.finetune is not None
    train = load_split(ins, "instruct", "train")
    val = load_split(ins, "instruct", "validation")
    fields: dict[str, str | None] = {"prompt_field": ins.prompt_field, "answer_field": ins.answer_field}
    require_fields(train, fields, ins.train_split)
    require_fields(val, fields, ins.validation_split)
    model_ref = spec.finetune.model
    model, codec, origin = seeded(seed, lambda: load_causal_lm(model_ref, spec.context))
    lora = spec.finetune.lora
    if lora is not None:
        base = model
        model = seeded(seed, lambda: apply_lora(base, lora, origin))

    def pair(record: dict[str, Any]) -> tuple[list[int], list[int]]:
        prompt = ins.prompt_template.format(prompt=record[ins.prompt_field])
        return sft_example(codec, prompt, str(record[ins.answer_field]), spec.context)

    train_items = [pair(r) for r in train]
    val_items = [pair(r) for r in val]
    for name, items in (("training", train_items), ("validation", val_items)):
        if not any(t != IGNORE for _, targets in items for t in targets):
            raise ValueError(
                f"no {name} answer fits in task.context ({spec.context} tokens) after its prompt; "
                "raise task.context"
            )
    collate = _collate(codec.pad_id)
    probes = val[: ins.eval_examples]

    def eval_metrics(net: nn.Module, device: torch.device) -> dict[str, float]:
        generations, references = [], []
        for record in probes:
            prompt_ids = codec.encode(ins.prompt_template.format(prompt=record[ins.prompt_field]))
            if codec.bos_id is not None:
                prompt_ids = [codec.bos_id, *prompt_ids]
            generations.append(greedy(net, origin, codec, prompt_ids, ins.max_new_tokens, spec.context))
            references.append(str(record[ins.answer_field]))
        return {"val_exact_match": exact_match(generations, references, ins.extraction, ins.marker)}

    return SupervisedParts(
        model=model,
        codec=codec,
        train_batches=ExampleBatches(train_items, collate, spec.batch_size, seed),
        val_batches=fixed_batches(val_items, collate, spec.batch_size),
        loss_fn=sft_loss(origin),
        eval_metrics=eval_metrics,
        roles=param_roles(model),
        info={"origin": origin, "train_examples": len(train_items), "val_examples": len(val_items)},
    )
