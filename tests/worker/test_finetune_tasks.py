"""classify and instruct tasks: data loading, label handling, answer-only loss, LoRA heads, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from server.jobs.spec import JobSpec, TaskSpec
from worker.lm.builtin import byte_codec
from worker.lm.classify import HEAD_NAMES, label_ids
from worker.lm.instruct import IGNORE, sft_example
from worker.lm.task import build_task
from worker.training.runner import execute_run
from worker.training.sinks import MemorySink


def _task(kind: str, model: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "context": 64,
        "batch_size": 8,
        "steps": 3,
        "warmup_steps": 1,
        "eval_every": 3,
        "log_every": 1,
        "fisher_every": 0,
        "finetune": {"model": model},
        **extra,
    }


def _run(task: dict[str, Any], target: dict[str, Any] | None = None) -> tuple[Any, MemorySink]:
    job = {
        "name": "t",
        "device": "cpu",
        "task": task,
        "optimizers": [{"name": "adamw", "hyperparameters": {"lr": 1e-3}}],
    }
    if target:
        job["target_metric"] = target
    spec = JobSpec.model_validate(job).expand()[0]
    sink = MemorySink()
    return execute_run(spec, sink), sink


def test_answer_only_loss_masks_exactly_the_prompt_tokens() -> None:
    codec = byte_codec()
    prompt, answer = "2+3=", "5"
    inputs, targets = sft_example(codec, prompt, answer, context=64)
    full = [codec.bos_id, *codec.encode(prompt), *codec.encode(answer), codec.eos_id]
    assert inputs == full[:-1]
    n_prompt = 1 + len(prompt)  # bos + prompt bytes
    # positions 0..n_prompt-2 predict prompt tokens: ignored; the rest predict the answer and eos
    assert targets[: n_prompt - 1] == [IGNORE] * (n_prompt - 1)
    assert targets[n_prompt - 1 :] == [*codec.encode(answer), codec.eos_id]
    assert len(inputs) == len(targets)


def test_labels_integers_strings_and_bad_kinds() -> None:
    assert label_ids([0, 2, 1], [1], None) == ([0, 2, 1], [1], ["0", "1", "2"])
    train, val, names = label_ids(["pos", "neg", "pos"], ["neg"], None)
    assert names == ["neg", "pos"] and train == [1, 0, 1] and val == [0]
    with pytest.raises(ValueError, match="integers or strings, found float"):
        label_ids([0.5, 1.0], [1.0], None)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        label_ids([0, 1], [2], 2)
    with pytest.raises(ValueError, match="not in the training split"):
        label_ids(["a", "b"], ["c"], None)


def test_lora_classification_trains_head_and_adapters_only(data_roots: Path) -> None:
    task = TaskSpec.model_validate(
        _task(
            "classify",
            "builtin:tiny-bert",
            classify={"demo_examples": 40},
            finetune={"model": "builtin:tiny-bert", "lora": {"r": 4}},
        )
    )
    built = build_task(task, seed=0)
    trainable = [name for name, _ in built.trainable_parameters()]
    assert any("lora_" in n for n in trainable)
    head = [n for n in trainable if any(h in n.split(".") for h in HEAD_NAMES)]
    assert head, "the classification head must be trained"
    assert all("lora_" in n or n in head for n in trainable), trainable
    assert built.info["trainable_parameters"] < built.info["parameters"] / 2
    roles = {built.roles[n] for n in head if n.endswith("weight")}
    assert roles == {"head"}


def test_classify_pairs_from_a_csv_folder_reports_scores(data_roots: Path) -> None:
    folder = data_roots / "pairs"
    folder.mkdir()
    for split, n in (("train", 48), ("validation", 16)):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["premise", "hypothesis", "gold"])
            for i in range(n):
                same = i % 2 == 0
                writer.writerow([f"word{i}", f"word{i}" if same else f"other{i}", "same" if same else "diff"])
    task = _task(
        "classify",
        "builtin:tiny-gpt2",
        classify={
            "source": "file",
            "path": str(folder),
            "text_field": "premise",
            "text_pair_field": "hypothesis",
            "label_field": "gold",
        },
    )
    result, sink = _run(task, {"name": "val_accuracy", "op": ">=", "value": 0.0})
    assert result.status == "succeeded", result.reason
    last = [m for _, m, _ in sink.records if "val_loss" in m][-1]
    for key in ("val_accuracy", "val_f1", "val_mcc"):
        assert 0.0 <= abs(last[key]) <= 1.0
    assert "val_ppl" not in last
    assert result.summary["final_val_accuracy"] == last["val_accuracy"]
    assert result.summary["reached_target"] == 1.0 and result.summary["steps_to_target"] == 0.0


def test_instruct_from_jsonl_reports_exact_match(data_roots: Path) -> None:
    path = data_roots / "qa"
    path.mkdir()
    for split in ("train", "validation"):
        rows = [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(12)]
        (path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = _task(
        "instruct",
        "builtin:tiny-gpt2",
        instruct={
            "source": "file",
            "path": str(path),
            "prompt_field": "question",
            "extraction": "marker",
            "eval_examples": 3,
            "max_new_tokens": 4,
        },
    )
    result, _sink = _run(task)
    assert result.status == "succeeded", result.reason
    assert "final_val_exact_match" in result.summary
    assert 0.0 <= result.summary["final_val_exact_match"] <= 1.0


@pytest.mark.parametrize(
    ("classify", "reason"),
    [
        ({"label_field": "gold"}, "label_field 'gold' is not a field"),
        ({"validation_split": "dev"}, "split 'dev' does not exist"),
    ],
)
def test_bad_data_fails_the_run_with_the_reason(
    data_roots: Path, classify: dict[str, Any], reason: str
) -> None:
    path = data_roots / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(10)))
    spec = {"source": "file", "path": str(path), "validation_split": "train[:4]", **classify}
    result, _ = _run(_task("classify", "builtin:tiny-bert", classify=spec))
    assert result.status == "failed"
    assert reason in (result.reason or "")


def test_instruct_context_too_short_for_any_answer_fails_with_reason() -> None:
    task = _task("instruct", "builtin:tiny-gpt2", context=16, instruct={"demo_examples": 30})
    result, _ = _run(task)
    assert result.status == "failed" and "raise task.context" in (result.reason or "")


def test_float_labels_fail_the_run(data_roots: Path) -> None:
    path = data_roots / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i / 3}) for i in range(10)))
    spec = {"source": "file", "path": str(path), "validation_split": "train[:4]"}
    result, _ = _run(_task("classify", "builtin:tiny-bert", classify=spec))
    assert result.status == "failed" and "integers or strings" in (result.reason or "")


def test_model_without_classification_head_fails_with_reason(data_roots: Path) -> None:
    from transformers import ViTConfig

    folder = data_roots / "vit"
    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(folder)
    result, _ = _run(_task("classify", str(folder), classify={"demo_examples": 40}))
    assert result.status == "failed"
    assert "no sequence-classification head" in (result.reason or "")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"task": _task("classify", "builtin:tiny-bert", classify={"demo": "nope"})}, "unknown demo 'nope'"),
        ({"task": _task("instruct", "builtin:tiny-bert")}, "cannot serve kind 'instruct'"),
        ({"task": _task("classify", "builtin:huge")}, "unknown built-in model"),
        ({"task": _task("classify", "builtin:tiny-bert", classify={"source": "file"})}, "path is required"),
        (
            {
                "task": _task("classify", "builtin:tiny-bert"),
                "target_metric": {"name": "val_exact_match", "op": ">=", "value": 1},
            },
            "not reported by kind 'classify'",
        ),
        ({"target_metric": {"name": "val_wow", "op": ">=", "value": 1}}, "unknown metric 'val_wow'"),
        ({"target_loss": 2.0, "target_metric": {"name": "val_loss", "op": "<=", "value": 2}}, "not both"),
    ],
)
def test_bad_specs_are_refused_at_submission(patch: dict[str, Any], message: str) -> None:
    job = {"name": "t", "optimizers": [{"name": "adamw"}], **patch}
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(job)


def test_target_loss_is_an_alias_of_a_val_loss_target() -> None:
    job = JobSpec.model_validate({"name": "t", "optimizers": [{"name": "adamw"}], "target_loss": 3.0})
    run = job.expand()[0]
    assert run.target_metric is not None
    assert (run.target_metric.name, run.target_metric.op, run.target_metric.value) == ("val_loss", "<=", 3.0)


def test_classify_lora_same_seed_same_start() -> None:
    spec = TaskSpec.model_validate(
        _task(
            "classify",
            "builtin:tiny-bert",
            classify={"demo_examples": 40},
            finetune={"model": "builtin:tiny-bert", "lora": {}},
        )
    )
    a, b = build_task(spec, 3), build_task(spec, 3)
    for (na, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na


class _CrashAt(MemorySink):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def log_metrics(self, step: int, metrics: Any, wall_time: float) -> None:
        if step == self.step:
            raise RuntimeError("simulated worker crash")
        super().log_metrics(step, metrics, wall_time)


def test_resumed_classify_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    """Example batches are a function of (seed, index) and the task metrics' running best is part
    of the checkpoint: a crash and resume changes no number."""
    task = _task("classify", "builtin:tiny-bert", classify={"demo_examples": 60}, steps=6, eval_every=2)
    task["checkpoint_every"] = 2
    spec = JobSpec.model_validate(
        {
            "name": "t",
            "device": "cpu",
            "task": task,
            "optimizers": [{"name": "adamw", "hyperparameters": {"lr": 3e-3}}],
        }
    ).expand()[0]
    full = execute_run(spec, MemorySink(), checkpoint_dir=tmp_path / "full")
    crashed = execute_run(spec, _CrashAt(3), checkpoint_dir=tmp_path / "resumed")
    assert crashed.status == "failed"
    resumed = execute_run(spec, MemorySink(), checkpoint_dir=tmp_path / "resumed")
    assert full.status == resumed.status == "succeeded"
    for key in ("final_val_loss", "final_val_accuracy", "best_val_accuracy", "best_val_mcc", "final_val_f1"):
        assert resumed.summary[key] == full.summary[key], key
