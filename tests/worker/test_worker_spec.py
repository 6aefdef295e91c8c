"""Job spec validation (errors name the field), expansion, limits and path confinement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.jobs.paths import confine_path
from server.jobs.spec import MAX_RUNS_PER_JOB, MAX_STEPS, JobSpec, format_validation_error, task_schema
from tests.support.worker import tiny_job

pytestmark = pytest.mark.usefixtures("data_roots")  # local paths confined to tmp_path


def _errors(data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return format_validation_error(info.value)


def test_valid_job_expands_to_optimizer_sweep_seed_runs() -> None:
    job = JobSpec.model_validate(
        tiny_job(
            [
                {"name": "adamw", "sweep": {"lr": [1e-3, 3e-3]}},
                {"name": "adamw", "label": "adamw-wd", "hyperparameters": {"lr": 1e-3, "weight_decay": 0.1}},
            ],
            seeds=[0, 1, 2],
        )
    )
    runs = job.expand()
    assert len(runs) == job.run_count() == 9
    keys = [r.run_key for r in runs]
    assert len(set(keys)) == 9 and "adamw[lr=0.003]-s2" in keys
    point = next(r for r in runs if r.run_key == "adamw[lr=0.003]-s2")
    assert point.hyperparameters["lr"] == 3e-3 and point.group == "adamw" and point.seed == 2
    assert {r.hyperparameters.get("weight_decay") for r in runs if r.group == "adamw-wd"} == {0.1}


def test_first_seed_selection_counts_both_stages() -> None:
    job = JobSpec.model_validate(
        tiny_job(
            [{"name": "adamw", "sweep": {"lr": [1e-3, 3e-3, 1e-2]}}],
            seeds=[0, 1, 2],
            sweep_selection="first_seed",
        )
    )
    assert job.run_count() == 3 + 2
    assert [r.seed for r in job.expand()] == [0, 0, 0]
    second = job.expand_selected({"adamw": {"lr": 3e-3}})
    assert [(r.seed, r.hyperparameters["lr"]) for r in second] == [(1, 3e-3), (2, 3e-3)]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"task": {"steps": 0}}, "task.steps: Input should be greater than 0"),
        ({"task": {"steps": MAX_STEPS + 1}}, "task.steps: Input should be less than or equal to"),
        ({"task": {"schedule": "cos"}}, "task.schedule: Input should be 'cosine', 'linear' or 'constant'"),
        (
            {"task": {"kind": "train"}},
            "task.kind: Input should be 'pretrain', 'finetune', 'classify' or 'instruct'",
        ),
        ({"task": {"corpus": {"name": "wiki"}}}, "task.corpus.name: Input should be 'pydoc', 'stdlib_code'"),
        ({"task": {"tokenizer": {"kind": "bpe", "vocab_size": 10}}}, "task.tokenizer.vocab_size"),
        ({"task": {"d_model": 30, "n_head": 4}}, "d_model (30) must be divisible by n_head (4)"),
        ({"task": {"kind": "finetune"}}, "finetune (with at least 'model') is required"),
        ({"task": {"grad_clip": float("inf")}}, "task.grad_clip: Input should be a finite number"),
        ({"device": "tpu"}, "device: Input should be 'auto', 'cpu' or 'cuda'"),
        ({"seeds": [1, 1]}, "seeds: seeds must be distinct"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"task": {"stepz": 3}}, "task.stepz: Extra inputs are not permitted"),
        ({"optimizers": []}, "optimizers: List should have at least 1 item"),
        (
            {"optimizers": [{"name": "adamw", "hyperparameters": {"lr": float("nan")}}]},
            "optimizers.0.hyperparameters.lr: must be a finite number",
        ),
        ({"optimizers": [{"name": "adamw", "sweep": {"lr": []}}]}, "optimizers.0.sweep.lr"),
        ({"optimizers": [{"name": "adamw"}, {"name": "adamw"}]}, "labels must be unique; repeated: adamw"),
    ],
)
def test_errors_name_the_field(patch: dict, needle: str) -> None:
    data = tiny_job()
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    assert needle in _errors(data)


def test_run_count_is_capped() -> None:
    sweep = {"lr": [1e-4 * (i + 1) for i in range(16)]}
    data = tiny_job([{"name": "adamw", "sweep": sweep}], seeds=list(range(MAX_RUNS_PER_JOB // 16 + 1)))
    assert f"the limit is {MAX_RUNS_PER_JOB}" in _errors(data)


def test_registry_checks_names_and_hyperparameters() -> None:
    pytest.importorskip("dykaf.baselines.registry")
    message = _errors(tiny_job([{"name": "sgdx"}]))
    assert "optimizers.0.name: unknown optimizer 'sgdx'; accepted:" in message and "dykaf" in message
    message = _errors(tiny_job([{"name": "adamw", "hyperparameters": {"lr": 1e30}}]))
    assert message.startswith("optimizers.0.hyperparameters: lr must be")
    message = _errors(tiny_job([{"name": "adamw", "hyperparameters": {"betta": 0.9}}]))
    assert "optimizers.0.hyperparameters" in message and "betta" in message
    message = _errors(tiny_job([{"name": "muon", "sweep": {"lr": [0.01, -1.0]}}]))
    assert message.startswith("optimizers.0.sweep: lr=-1.0")
    # Defaults are filled in the expanded runs.
    (run,) = JobSpec.model_validate(tiny_job([{"name": "adamw"}])).expand()
    assert {"lr", "weight_decay"} <= set(run.hyperparameters)


def test_paths_outside_data_roots_are_rejected(tmp_path: Path) -> None:
    inside = tmp_path / "corpus.txt"
    inside.write_text("hello", encoding="utf-8")
    assert confine_path(str(inside)) == inside.resolve()
    for bad in ("/etc/passwd", str(tmp_path / ".." / "escape.txt"), "~/../../etc/hosts"):
        with pytest.raises(ValueError, match="outside the allowed data roots"):
            confine_path(bad)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(ValueError, match="outside the allowed data roots"):
        confine_path(str(tmp_path / "link" / "hosts"))
    message = _errors(
        tiny_job(task={**tiny_job()["task"], "corpus": {"name": "file", "path": "/etc/passwd"}})
    )
    assert message.startswith("task.corpus.path: path '/etc/passwd'") and "DYKAF_DATA_ROOTS" in message
    finetune = {**tiny_job()["task"], "kind": "finetune", "finetune": {"model": "../../outside"}}
    assert "task.finetune.model" in _errors(tiny_job(task=finetune))


def test_default_root_is_the_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DYKAF_DATA_ROOTS", raising=False)
    monkeypatch.setenv("DYKAF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    assert confine_path("data/x.txt") == (tmp_path / "data" / "x.txt").resolve()
    for outside in ("x.txt", str(tmp_path / "cache" / "y"), os.path.dirname(tmp_path)):
        with pytest.raises(ValueError, match=r"outside the allowed data roots|inside the lab state"):
            confine_path(outside)


def test_hub_ids_are_accepted_and_malformed_references_rejected() -> None:
    task = {**tiny_job()["task"], "kind": "finetune", "finetune": {"model": "sshleifer/tiny-gpt2"}}
    assert JobSpec.model_validate(tiny_job(task=task)).task.finetune.model == "sshleifer/tiny-gpt2"
    task["finetune"] = {"model": "a/b/c d"}
    assert "neither an existing local path nor a hub id" in _errors(tiny_job(task=task))


def test_task_schema_has_defaults_and_enums() -> None:
    schema = task_schema()
    props = schema["properties"]
    assert props["steps"]["default"] == 500 and props["steps"]["exclusiveMinimum"] == 0
    assert props["kind"]["enum"] == ["pretrain", "finetune", "classify", "instruct"]
    assert set(schema["$defs"]) >= {"CorpusSpec", "TokenizerSpec", "FinetuneSpec", "LoraSpec"}


@pytest.mark.parametrize(
    "name", ["Vergleich für Müller", "比較テスト 2", "हिन्दी-run", "Ωmega_1.5", "Ärger", "x" * 80]
)
def test_names_and_labels_accept_letters_of_any_script(name: str) -> None:
    job = tiny_job([{"name": "adamw", "label": name}], name=name)
    spec = JobSpec.model_validate(job)
    assert spec.name == name and spec.expand()[0].label == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 81,
        "=HYPERLINK(1)",
        "+1",
        "-1",
        "@SUM",
        " lead",
        "a\u202eb",
        "a\u200bb",
        "a\x07b",
        "a\tb",
        "a/b",
    ],
)
def test_names_refuse_controls_bidi_overrides_and_formula_leads(name: str) -> None:
    with pytest.raises(ValidationError, match="name must be 1-80 letters \\(of any script\\)"):
        JobSpec.model_validate(tiny_job(name=name))
    with pytest.raises(ValidationError, match="label must be 1-80 letters \\(of any script\\)"):
        JobSpec.model_validate(tiny_job([{"name": "adamw", "label": name}]))
