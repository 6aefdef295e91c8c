"""The LLaMA model against independent computations, presets' sizes, tokens→steps, FLOPs, compile."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from server.jobs.spec import PRESETS, TaskSpec, parse_job
from tests.support.worker import tiny_job
from worker.lm.llama import Llama, LlamaConfig, SwiGLU, apply_rotary, rotary_tables
from worker.lm.model import GPT, GPTConfig
from worker.lm.presets import preset_parameters
from worker.lm.throughput import device_peak_flops, flops_per_token, mfu
from worker.training.runner import execute_run
from worker.training.sinks import MemorySink


def test_rotary_embedding_matches_complex_rotation_float64() -> None:
    torch.manual_seed(0)
    length, dim, base = 5, 8, 10_000.0
    x = torch.randn(2, length, dim, dtype=torch.float64)
    cos, sin = rotary_tables(dim, length, base, dtype=torch.float64)
    got = apply_rotary(x, cos, sin)
    # Reference: the pair (x[i], x[i + d/2]) as one complex number turned by position · base^(-2i/d).
    half = dim // 2
    want = torch.empty_like(x)
    for pos in range(length):
        for i in range(half):
            angle = pos * base ** (-2 * i / dim)
            z = torch.complex(x[:, pos, i], x[:, pos, i + half]) * complex(math.cos(angle), math.sin(angle))
            want[:, pos, i], want[:, pos, i + half] = z.real, z.imag
    assert torch.allclose(got, want, atol=1e-12)
    # Position 0 is untouched and rotations keep lengths.
    assert torch.allclose(got[:, 0], x[:, 0])
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1))


def test_swiglu_matches_hand_computation_float64() -> None:
    layer = SwiGLU(2, 3).double()
    with torch.no_grad():
        layer.gate_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.up_proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.5, 0.5]]))
        layer.down_proj.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
    x = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    gate = [0.5, -2.0, -1.5]
    up = [1.0, 2.0, -0.75]
    h = [g / (1 + math.exp(-g)) * u for g, u in zip(gate, up, strict=True)]
    want = torch.tensor([[h[0] + h[2], h[1] - h[2]]], dtype=torch.float64)
    assert torch.allclose(layer(x), want, atol=1e-14)


def test_llama_equals_transformers_llama_with_the_same_weights() -> None:
    """An independent implementation (transformers' eager attention) on copied weights, in float64."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, context=12, ffn_hidden=40)
    torch.manual_seed(1)
    ours = Llama(config).double().eval()
    hf_config = HFConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=12,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    hf_config._attn_implementation = "eager"
    theirs = LlamaForCausalLM(hf_config).double().eval()
    renames = {
        "embed.": "model.embed_tokens.",
        "norm.": "model.norm.",
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "attn.": "self_attn.",
        "blocks.": "model.layers.",
    }
    state = {}
    for name, value in ours.state_dict().items():
        target = name
        for a, b in renames.items():
            target = (
                target.replace(a, b) if not (a in ("embed.", "norm.") and not name.startswith(a)) else target
            )
        state[target] = value
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    idx = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        # Both build their rotary tables in float32 (then cast), hence a float32-level tolerance.
        assert torch.allclose(ours(idx), theirs(input_ids=idx).logits, atol=1e-6)


def test_llama_roles_and_tied_weights() -> None:
    model = Llama(LlamaConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, context=8, tie_weights=True))
    roles = model.param_roles()
    assert roles["embed.weight"] == "embedding" and "lm_head.weight" not in roles  # tied: listed once
    assert (
        roles["blocks.0.attn.q_proj.weight"] == "hidden"
        and roles["blocks.0.mlp.down_proj.weight"] == "hidden"
    )
    assert roles["blocks.0.attn_norm.weight"] == "vector" and roles["norm.weight"] == "vector"
    assert not any(name.endswith("bias") for name in roles)
    untied = Llama(LlamaConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, context=8)).param_roles()
    assert untied["lm_head.weight"] == "head"


def _hf_count(name: str) -> int:
    """The same published configuration built by transformers (meta device, no memory)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
    from transformers import LlamaConfig as HFConfig

    p = PRESETS[name]
    with torch.device("meta"):
        if p.arch == "gpt":
            model: Any = GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=p.vocab_size,
                    n_positions=p.context,
                    n_embd=p.d_model,
                    n_layer=p.n_layer,
                    n_head=p.n_head,
                )
            )
        else:
            model = LlamaForCausalLM(
                HFConfig(
                    vocab_size=p.vocab_size,
                    hidden_size=p.d_model,
                    intermediate_size=p.ffn_hidden,
                    num_hidden_layers=p.n_layer,
                    num_attention_heads=p.n_head,
                    num_key_value_heads=p.n_head,
                    tie_word_embeddings=p.tie_weights,
                )
            )
    return sum(t.numel() for t in model.parameters())


@pytest.mark.parametrize("name", ["gpt2-124m", "llama-60m", "llama-130m", "llama-350m", "llama-1b"])
def test_preset_parameter_counts_match_published(name: str) -> None:
    ours = preset_parameters(name)
    published = PRESETS[name].published_parameters
    assert published is not None
    assert abs(ours - published) / published < 0.02
    assert abs(ours - _hf_count(name)) / _hf_count(name) < 0.02
    nominal = {
        "gpt2-124m": 124e6,
        "llama-60m": 60e6,
        "llama-130m": 130e6,
        "llama-350m": 350e6,
        "llama-1b": 1.0e9,
    }
    assert 0.9 < ours / nominal[name] < 1.4  # the names round (e.g. 1B is 1.34 B with its 32k vocabulary)


def test_preset_fills_fields_tokens_give_steps() -> None:
    spec = TaskSpec(preset="llama-130m", batch_size=8, grad_accum=4, tokens=10_000_000, d_model=384, n_head=6)
    assert (spec.arch, spec.n_layer, spec.vocab_size, spec.context) == ("llama", 12, 32000, 1024)
    assert spec.d_model == 384  # explicit fields win
    assert spec.steps == math.ceil(10_000_000 / (8 * 4 * 1024))
    assert TaskSpec.model_validate_json(spec.model_dump_json()).steps == spec.steps
    with pytest.raises(ValueError, match="not both"):
        TaskSpec(tokens=1_000_000, steps=3)
    with pytest.raises(ValueError, match="unknown preset"):
        TaskSpec(preset="llama-7b")


def test_flops_per_token_and_mfu() -> None:
    config = GPTConfig(vocab_size=100, n_layer=2, n_head=2, d_model=16, context=8)
    model = GPT(config)
    # Matmul parameters: per block 4·d² (attention) + 8·d² (MLP), plus the head; not the lookups.
    n = 2 * 12 * 16 * 16 + 100 * 16
    assert flops_per_token(model, 8) == 6 * n + 12 * 2 * 16 * 8
    tied = GPT(GPTConfig(vocab_size=100, n_layer=2, n_head=2, d_model=16, context=8, tie_weights=True))
    assert flops_per_token(tied, 8) == flops_per_token(model, 8)  # the shared matrix still multiplies
    assert device_peak_flops("NVIDIA H200", bf16=True) == pytest.approx(989.4e12)
    assert device_peak_flops("NVIDIA H100 PCIe", bf16=True) == pytest.approx(756.5e12)
    assert device_peak_flops("cpu", bf16=True) is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def _tiny_spec(**task: Any) -> Any:
    job = tiny_job()
    job["task"].update(steps=3, warmup_steps=1, eval_every=3, fisher_every=0, **task)
    return parse_job(job).expand()[0]


@pytest.mark.usefixtures("data_roots")
def test_llama_run_reports_throughput() -> None:
    result = execute_run(_tiny_spec(arch="llama"), MemorySink())
    assert result.status == "succeeded", result.reason
    s = result.summary
    assert s["flops_per_token"] > 6 * s["parameters"] * 0.5
    assert 0 < s["optimizer_share"] < 1
    assert s["model_tflops"] == pytest.approx(s["tokens_per_s"] * s["flops_per_token"] / 1e12)
    assert "mfu" not in s  # no peak on a CPU


@pytest.mark.usefixtures("data_roots")
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_compiled_run_equals_eager_run(arch: str) -> None:
    eager, compiled = MemorySink(), MemorySink()
    assert execute_run(_tiny_spec(arch=arch), eager).status == "succeeded"
    result = execute_run(_tiny_spec(arch=arch, compile=True), compiled)
    assert result.status == "succeeded", result.reason
    # Compilation happened before the timed steps and is reported on its own.
    assert result.summary["compile_time_s"] > result.summary["train_time_s"] / 3
    a, b = eager.series("train_loss"), compiled.series("train_loss")
    assert len(a) == len(b) == 3
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5)
    assert dict(eager.series("val_loss"))[3] == pytest.approx(dict(compiled.series("val_loss"))[3], rel=1e-4)


def test_presets_command_prints_sizes_and_chinchilla_tokens() -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    result = CliRunner().invoke(app, ["presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Chinchilla" in result.output
    line = next(row for row in result.output.splitlines() if "llama-130m" in row)
    assert "134.1 M" in line and "2.68 B" in line  # 134.1 M parameters x 20 tokens
