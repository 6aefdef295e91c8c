"""Fine-tuning through the real loading paths: tiny randomly initialised Hugging Face models saved to a
temporary directory (with a tokenizer built here), LoRA via peft, and our own pre-training exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.jobs.spec import CorpusSpec, JobSpec, RunSpec
from tests.support.worker import tiny_job, tiny_task
from worker.lm.corpora import load_documents
from worker.training import runner as runner_mod
from worker.training.runner import execute_run
from worker.training.sinks import MemorySink

pytestmark = pytest.mark.usefixtures("data_roots")  # local paths confined to tmp_path

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def _tokenizer(directory: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_documents(CorpusSpec(name="pydoc", max_chars=50_000)), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def _save_tiny(directory: Path, arch: str) -> Path:
    directory.mkdir(parents=True)
    tokenizer = _tokenizer(directory)
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def _finetune_spec(model: str, optimizer: str = "adamw", lora: Any = None, **task: Any) -> RunSpec:
    fields = {
        "kind": "finetune",
        "finetune": {"model": model, "lora": lora},
        "steps": 10,
        "warmup_steps": 1,
        "eval_every": 10,
        "corpus": {"name": "pydoc", "max_chars": 60_000},
        **task,
    }
    job = tiny_job([{"name": optimizer, "hyperparameters": {"lr": 3e-3}}], task=tiny_task(**fields))
    (spec,) = JobSpec.model_validate(job).expand()
    return spec


def _capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Keep a handle on the model the runner trains, and its weights before training."""
    captured: dict[str, Any] = {}
    real = runner_mod.build_task

    def build(spec: Any, seed: int) -> Any:
        task = real(spec, seed)
        captured["task"] = task
        captured["before"] = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        return task

    monkeypatch.setattr(runner_mod, "build_task", build)
    return captured


def _changed(captured: dict[str, Any]) -> set[str]:
    model = captured["task"].model
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), captured["before"][n])}


def test_full_finetune_of_a_local_gpt2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _save_tiny(tmp_path / "gpt2", "gpt2")
    captured = _capture(monkeypatch)
    sink = MemorySink()
    result = execute_run(_finetune_spec(str(model_dir), optimizer="dykaf"), sink)
    assert result.status == "succeeded", result.reason
    val = dict(sink.series("val_loss"))
    assert val[10] < val[0]
    task = captured["task"]
    assert task.info["origin"] == "hf" and task.tokenizer.vocab_size == 320
    assert task.roles["transformer.wte.weight"] == "embedding"
    assert task.roles["transformer.h.0.attn.c_attn.weight"] == "hidden"
    assert task.roles["transformer.ln_f.weight"] == "vector"
    assert "transformer.h.0.attn.c_attn.weight" in _changed(captured)


def test_lora_finetune_of_a_local_llama_changes_only_adapters(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir = _save_tiny(tmp_path / "llama", "llama")
    captured = _capture(monkeypatch)
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    sink = MemorySink()
    result = execute_run(_finetune_spec(str(model_dir), lora=lora), sink)
    assert result.status == "succeeded", result.reason
    assert all(torch.isfinite(torch.tensor(v)) for _, v in sink.series("train_loss"))
    changed = _changed(captured)
    assert changed and all("lora_" in name for name in changed)
    assert any("q_proj.lora_B" in name for name in changed)
    trainable = [n for n, _ in captured["task"].trainable_parameters()]
    assert trainable and all("lora_" in n for n in trainable)
    assert result.summary["trainable_parameters"] < result.summary["parameters"] / 5


def test_finetune_from_our_own_pretraining_export(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (pretrain,) = JobSpec.model_validate(tiny_job(task=tiny_task(steps=4))).expand()
    assert execute_run(pretrain, MemorySink(), checkpoint_dir=tmp_path / "pre").status == "succeeded"
    assert (tmp_path / "pre" / "model.pt").is_file()
    captured = _capture(monkeypatch)
    result = execute_run(
        _finetune_spec(str(tmp_path / "pre"), lora={"r": 2}, steps=3, eval_every=3), MemorySink()
    )
    assert result.status == "succeeded", result.reason
    assert captured["task"].info["origin"] == "gpt" and captured["task"].tokenizer.vocab_size == 257
    changed = _changed(captured)
    assert changed and all("qkv.lora_" in name for name in changed)
    full = execute_run(
        _finetune_spec(str(tmp_path / "pre" / "model.pt"), steps=2, eval_every=2), MemorySink()
    )
    assert full.status == "succeeded" and full.summary["trainable_parameters"] == full.summary["parameters"]


def test_context_longer_than_the_model_fails_with_a_reason(tmp_path: Path) -> None:
    model_dir = _save_tiny(tmp_path / "gpt2", "gpt2")
    result = execute_run(_finetune_spec(str(model_dir), context=128), MemorySink())
    assert result.status == "failed" and "exceeds the pretrained model's maximum (64)" in (
        result.reason or ""
    )


def test_hub_ids_go_to_from_pretrained_and_failures_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.lm import hf

    asked: list[str] = []

    def offline(source: str) -> Any:
        asked.append(source)
        raise OSError(f"cannot reach the hub for {source}")

    monkeypatch.setattr(hf, "load_hf_causal_lm", offline)
    result = execute_run(_finetune_spec("some-owner/some-model"), MemorySink())
    assert asked == ["some-owner/some-model"]
    assert (
        result.status == "failed"
        and result.reason == "OSError: cannot reach the hub for some-owner/some-model"
    )
