"""The comparison job schema: one pydantic model shared by the YAML command line and the REST API.

A ``JobSpec`` names a task (what to train and on which data), the optimizers to compare (each with
fixed hyperparameters and an optional sweep), the seeds, the device preference and an optional target
loss. ``JobSpec.expand()`` turns it into ``RunSpec`` objects, one per optimizer × sweep point × seed,
which is all a worker needs to execute one run.

Validation is strict on purpose (``extra="forbid"``, finite numbers only, caps on steps and runs,
local paths confined to the data roots) because the same schema faces untrusted REST clients; errors
carry the field path so that ``format_validation_error`` can tell the user exactly what to fix.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.jobs.paths import confine_path
from server.jobs.status import RunStatus
from server.metrics_registry import metric, summary_key

MAX_STEPS = 200_000
MAX_RUNS_PER_JOB = 256
MAX_SEEDS = 32
MAX_SWEEP_VALUES = 16
MAX_CORPUS_CHARS = 500_000_000
MAX_CONTEXT = 32_768
# Processes (GPUs, or Gloo processes on CPU) one run may train on; what workers can offer is checked
# at submission (``server.crud.workers``).
MAX_DEVICES_PER_RUN = 64

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Names and labels: 1-80 characters, Unicode letters and digits (with their combining marks, which
# scripts such as Devanagari need), spaces and ._+-, starting with a letter or digit. So no control
# or bidi-override character (category C*) and no leading = + - @ that a spreadsheet opening a CSV
# would run as a formula.
NAME_MAX = 80
NAME_PUNCTUATION = " ._+-"
NAME_RULE = f"1-{NAME_MAX} letters (of any script), digits, spaces or ._+- and start with a letter/digit"


def check_name(value: str) -> str:
    """``value`` if it follows the name rule (jobs and studies alike), else a ValueError saying it."""
    if not valid_name(value):
        raise ValueError(f"name must be {NAME_RULE}")
    return value


def check_seeds(value: list[int]) -> list[int]:
    """Distinct seeds that fit a 32-bit generator seed (jobs and studies alike)."""
    if len(set(value)) != len(value):
        raise ValueError("seeds must be distinct")
    if any(seed < 0 or seed >= 2**31 for seed in value):
        raise ValueError("seeds must be in [0, 2**31)")
    return value


def valid_name(value: str) -> bool:
    """Whether ``value`` follows the name rule above (letters and digits of any script)."""
    if not 1 <= len(value) <= NAME_MAX or unicodedata.category(value[0])[0] not in "LN":
        return False
    return all(char in NAME_PUNCTUATION or unicodedata.category(char)[0] in "LMN" for char in value[1:])


class StrictModel(BaseModel):
    """Base for every spec model: unknown fields and NaN/inf are errors, not silently kept."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


def looks_like_local_path(value: str) -> bool:
    """True when ``value`` names a local file or directory rather than a Hugging Face hub id.

    Explicit path syntax (absolute, ``./``, ``../``, ``~``) always counts as local, and so does a
    relative name that exists; anything else must be a well-formed ``owner/name`` hub id.
    """
    if value.startswith(("/", ".", "~")) or os.path.isabs(value):
        return True
    return os.path.exists(value)


def _check_local_or_hub(value: str, what: str) -> str:
    """Validate a model/dataset reference: confine local paths, check hub ids are well formed."""
    if looks_like_local_path(value):
        confine_path(value)
        return value
    if ".." in value or not _HUB_ID.match(value):
        raise ValueError(
            f"{what} {value!r} is neither an existing local path nor a hub id of the form 'owner/name'"
        )
    return value


class CorpusSpec(StrictModel):
    """Which text to train on and how to split it into training and validation parts."""

    name: Literal["pydoc", "stdlib_code", "file", "hf", "shards"] = Field(
        "pydoc",
        description="pydoc: the Python documentation topics (English prose, embedded); stdlib_code: the "
        "Python standard library's source (embedded); file: a local .txt/.jsonl/.parquet file or "
        "directory; hf: a Hugging Face dataset by name (or a local dataset directory); shards: a folder "
        "of token shards written by `dykaf-lab prepare-data` (read from disk, any size; the tokenizer "
        "is the one recorded in its manifest)",
    )
    path: str | None = Field(
        None, description="local file or directory (name='file'), shard folder (name='shards')"
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="file format (name='file'); auto picks by extension"
    )
    text_field: str = Field("text", description="column holding the text (jsonl, parquet, hf)")
    hf_name: str | None = Field(None, description="dataset id or local dataset directory (name='hf')")
    hf_config: str | None = Field(None, description="dataset configuration (name='hf')")
    hf_split: str = Field("train", description="dataset split, slicing allowed e.g. 'train[:5000]'")
    max_chars: int = Field(
        4_000_000, gt=0, le=MAX_CORPUS_CHARS, description="the corpus is truncated to this many characters"
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of the corpus held out")

    @field_validator("path")
    @classmethod
    def _confine(cls, value: str | None) -> str | None:
        if value is not None:
            confine_path(value)
        return value

    @field_validator("hf_name")
    @classmethod
    def _hf_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_local_or_hub(value, "dataset")

    @model_validator(mode="after")
    def _required_per_kind(self) -> CorpusSpec:
        if self.name in ("file", "shards") and not self.path:
            raise ValueError(f"corpus.path is required when corpus.name is '{self.name}'")
        if self.name == "hf" and not self.hf_name:
            raise ValueError("corpus.hf_name is required when corpus.name is 'hf'")
        return self


class TokenizerSpec(StrictModel):
    """Tokenizer for pre-training; fine-tuning always uses the pretrained model's own tokenizer."""

    kind: Literal["byte", "bpe"] = Field("byte", description="byte: UTF-8 bytes, no training; bpe: trained")
    vocab_size: int = Field(4096, ge=300, le=131_072, description="BPE vocabulary size (kind='bpe')")


class LoraSpec(StrictModel):
    """LoRA adapters via peft; only the adapter weights are trained."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None,
        description="module names to adapt (e.g. ['q_proj', 'v_proj']); null uses peft's default for "
        "known architectures, or ['qkv'] for checkpoints of our own GPT",
    )


class FinetuneSpec(StrictModel):
    """The pretrained starting point for ``task.kind == 'finetune'``."""

    model: str = Field(
        ...,
        description="a local Hugging Face model directory, a hub id, a model.pt exported by an earlier "
        "pre-training run (or the directory holding it), or builtin:tiny-bert / builtin:tiny-gpt2 "
        "(randomly initialised from a config on a byte vocabulary: offline demos and tests)",
    )
    lora: LoraSpec | None = Field(None, description="null = full fine-tuning")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value.startswith(BUILTIN_PREFIX):
            if value not in BUILTIN_MODELS:
                raise ValueError(f"unknown built-in model {value!r}; accepted: {', '.join(BUILTIN_MODELS)}")
            return value
        return _check_local_or_hub(value, "model")


class ModelPreset(StrictModel):
    """A named model size from the literature; ``published_parameters`` is the count its source
    reports (or, for a configuration published without a count, the Hugging Face model's count)."""

    arch: Literal["gpt", "llama"]
    n_layer: int
    n_head: int
    d_model: int
    context: int
    vocab_size: int | None = None
    ffn_hidden: int | None = None
    tie_weights: bool = False
    published_parameters: int | None = None
    source: str = ""


# The presets a task may name (``task.preset``); the explicit task fields win over a preset's.
PRESETS: dict[str, ModelPreset] = {
    "gpt-micro": ModelPreset(
        arch="gpt", n_layer=1, n_head=2, d_model=32, context=16, source="the test suite's tiny GPT"
    ),
    "gpt-tiny": ModelPreset(
        arch="gpt", n_layer=4, n_head=4, d_model=128, context=128, source="the default task's GPT"
    ),
    "llama-tiny": ModelPreset(
        arch="llama", n_layer=4, n_head=4, d_model=128, context=128, source="the default task as LLaMA"
    ),
    "gpt2-124m": ModelPreset(
        arch="gpt",
        n_layer=12,
        n_head=12,
        d_model=768,
        context=1024,
        vocab_size=50257,
        tie_weights=True,
        published_parameters=124_439_808,
        source="GPT-2 small (Radford et al. 2019; Hugging Face 'gpt2'), without biases as in nanoGPT",
    ),
    "llama-60m": ModelPreset(
        arch="llama",
        n_layer=8,
        n_head=8,
        d_model=512,
        context=1024,
        vocab_size=32000,
        ffn_hidden=1376,
        published_parameters=58_073_600,
        source="GaLore's llama_60m config (Zhao et al. 2024); nominal 60M",
    ),
    "llama-130m": ModelPreset(
        arch="llama",
        n_layer=12,
        n_head=12,
        d_model=768,
        context=1024,
        vocab_size=32000,
        ffn_hidden=2048,
        published_parameters=134_105_856,
        source="GaLore's llama_130m config (Zhao et al. 2024); nominal 130M",
    ),
    "llama-350m": ModelPreset(
        arch="llama",
        n_layer=24,
        n_head=16,
        d_model=1024,
        context=1024,
        vocab_size=32000,
        ffn_hidden=2736,
        published_parameters=367_969_280,
        source="GaLore's llama_350m config (Zhao et al. 2024); nominal 350M",
    ),
    "llama-1b": ModelPreset(
        arch="llama",
        n_layer=24,
        n_head=32,
        d_model=2048,
        context=1024,
        vocab_size=32000,
        ffn_hidden=5461,
        published_parameters=1_339_082_752,
        source="GaLore's llama_1b config (Zhao et al. 2024); nominal 1B",
    ),
}
_PRESET_FIELDS = (
    "arch",
    "n_layer",
    "n_head",
    "d_model",
    "context",
    "vocab_size",
    "ffn_hidden",
    "tie_weights",
)


BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny-bert", "builtin:tiny-gpt2")
DEMO_CLASSIFY = ("stdlib_module", "pydoc_topic")
DEMO_INSTRUCT = ("arithmetic",)


class DatasetSpec(StrictModel):
    """Where labelled examples come from: a demo task built in code, a Hugging Face dataset (hub id
    or local dataset directory), or a local CSV/TSV/JSONL/Parquet file or folder of such files."""

    source: Literal["demo", "hf", "file"] = Field("demo", description="demo: built offline from code")
    demo: str | None = Field(None, description="demo task name (source='demo'); null = the kind's first")
    demo_examples: int = Field(600, ge=20, le=100_000, description="examples a demo task builds")
    hf_name: str | None = Field(None, description="dataset id or local dataset directory (source='hf')")
    hf_config: str | None = Field(None, description="dataset configuration, e.g. 'sst2' of 'nyu-mll/glue'")
    path: str | None = Field(
        None,
        description="local file (source='file': .csv .tsv .jsonl .json .parquet) or a folder holding "
        "one file per split named after it (train.csv, validation.csv, ...)",
    )
    train_split: str = Field("train", description="split to train on (slicing allowed, 'train[:90%]')")
    validation_split: str = Field("validation", description="split to evaluate on")
    max_train_examples: int | None = Field(None, gt=0, le=10_000_000)
    max_val_examples: int | None = Field(512, gt=0, le=1_000_000)

    @field_validator("path")
    @classmethod
    def _confine(cls, value: str | None) -> str | None:
        if value is not None:
            confine_path(value)
        return value

    @field_validator("hf_name")
    @classmethod
    def _hf_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_local_or_hub(value, "dataset")

    @model_validator(mode="after")
    def _required_per_source(self) -> DatasetSpec:
        if self.source == "file" and not self.path:
            raise ValueError("path is required when source is 'file'")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("hf_name is required when source is 'hf'")
        return self


class ClassifySpec(DatasetSpec):
    """Sequence classification (``task.kind == 'classify'``): single texts or pairs with a label."""

    text_field: str = Field("text", description="column of the (first) text; GLUE: sentence, premise...")
    text_pair_field: str | None = Field(None, description="column of the second text of a pair, if any")
    label_field: str = Field("label", description="column of the label: integers 0..K-1 or strings")
    num_labels: int | None = Field(None, ge=2, le=10_000, description="null = inferred from the data")
    primary_metric: Literal["val_accuracy", "val_f1", "val_mcc"] = Field(
        "val_accuracy", description="what judges the job: accuracy, macro-F1, or Matthews (GLUE CoLA)"
    )

    @model_validator(mode="after")
    def _demo_name(self) -> ClassifySpec:
        if self.source == "demo" and self.demo not in (None, *DEMO_CLASSIFY):
            raise ValueError(f"unknown demo {self.demo!r}; accepted: {', '.join(DEMO_CLASSIFY)}")
        return self


class InstructSpec(DatasetSpec):
    """Supervised fine-tuning of a causal LM on prompt/answer pairs (``task.kind == 'instruct'``)."""

    prompt_field: str = Field("prompt", description="column of the prompt (GSM8K: 'question')")
    answer_field: str = Field("answer", description="column of the reference answer")
    prompt_template: str = Field(
        "{prompt}\n", max_length=2000, description="how a prompt is shown; must contain '{prompt}'"
    )
    extraction: Literal["last_number", "marker", "full"] = Field(
        "last_number", description="how the final answer is read from a generation and a reference"
    )
    marker: str = Field("####", min_length=1, max_length=50, description="extraction='marker'")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="greedy generation length limit")
    eval_examples: int = Field(64, ge=1, le=10_000, description="validation examples generated per eval")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("prompt_template must contain '{prompt}'")
        return value

    @model_validator(mode="after")
    def _demo_name(self) -> InstructSpec:
        if self.source == "demo" and self.demo not in (None, *DEMO_INSTRUCT):
            raise ValueError(f"unknown demo {self.demo!r}; accepted: {', '.join(DEMO_INSTRUCT)}")
        return self


class TargetMetric(StrictModel):
    """A quality to reach, e.g. ``{name: val_accuracy, op: ">=", value: 0.85}``."""

    name: str = Field(..., description="a metric of the run: val_loss, val_accuracy, val_f1, val_mcc, ...")
    op: Literal[">=", ">", "<=", "<"] = Field(..., description="comparison with value")
    value: float

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        metric(value)
        return value


class TaskSpec(StrictModel):
    """What is trained and how: model size, data, batch, schedule, measurement cadence."""

    kind: Literal["pretrain", "finetune", "classify", "instruct"] = Field(
        "pretrain",
        description="pretrain: a GPT from scratch; finetune: causal-LM loss on text from a pretrained "
        "model; classify: sequence classification (accuracy, macro-F1, MCC); instruct: SFT on "
        "prompt/answer pairs (exact match of greedy generations)",
    )
    # model (pretrain)
    preset: str | None = Field(
        None,
        description="a named model size that fills arch, layers, heads, width, context and vocabulary "
        f"(fields given explicitly win): {', '.join(PRESETS)}",
    )
    arch: Literal["gpt", "llama"] = Field(
        "gpt",
        description="gpt: LayerNorm, learned positions, GELU MLP; llama: RMSNorm, rotary embeddings, "
        "SwiGLU, no biases",
    )
    vocab_size: int | None = Field(
        None, ge=2, le=1_048_576, description="model vocabulary; null = the tokenizer's (must hold every id)"
    )
    ffn_hidden: int | None = Field(
        None, ge=1, le=131_072, description="llama feed-forward width; null = 8/3·d"
    )
    compile: bool = Field(False, description="run the model under torch.compile")
    n_layer: int = Field(4, ge=1, le=128)
    n_head: int = Field(4, ge=1, le=128)
    d_model: int = Field(128, ge=8, le=16_384)
    context: int = Field(128, ge=4, le=MAX_CONTEXT, description="sequence length in tokens")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_weights: bool = Field(False, description="share the embedding and output matrices")
    # batch and length
    batch_size: int = Field(16, ge=1, le=4096, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step (per device)")
    devices_per_run: int = Field(
        1,
        ge=1,
        le=MAX_DEVICES_PER_RUN,
        description="devices (GPUs; Gloo processes on CPU) one run trains on under torch.distributed; "
        "batch_size is per device, so the global batch is batch_size · devices_per_run · grad_accum. "
        "An N-device run sees exactly the data of a 1-device run with N times the grad_accum",
    )
    distributed: Literal["shard", "replicate"] = Field(
        "shard",
        description="how a multi-device run shares the optimizer: shard = each matrix has one owner "
        "rank that updates its state and broadcasts the new weights (no work repeated); replicate = "
        "plain DDP, every rank repeats the whole optimizer step",
    )
    steps: int = Field(500, gt=0, le=MAX_STEPS, description="optimizer steps")
    tokens: int | None = Field(
        None,
        gt=0,
        description="training tokens instead of steps: steps = ceil(tokens / (batch_size · grad_accum · "
        "devices_per_run · context))",
    )
    # schedule and clipping
    warmup_steps: int = Field(50, ge=0, le=MAX_STEPS)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of the peak")
    grad_clip: float = Field(1.0, ge=0.0, description="max global gradient norm; 0 disables clipping")
    # measurement cadence
    eval_every: int = Field(50, ge=1, le=MAX_STEPS)
    eval_batches: int = Field(8, ge=1, le=10_000, description="validation micro-batches per evaluation")
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    fisher_every: int = Field(
        250,
        ge=0,
        le=MAX_STEPS,
        description="Fisher-fidelity diagnostics every this many steps and at the last step; 0 disables. "
        "Only the steps shortly before a report pay for the probes (the ring: the last fisher_window "
        "steps; the shadow estimators: the last ≈135 at β = 0.95), so the cost falls as the cadence "
        "grows (figures: BENCHMARKS.md, 'Diagnostics overhead'; each run "
        "measures its own: fisher_overhead), less on larger models; that time is kept out of the "
        "step times; see dykaf/fisher/README.md 'Cost'",
    )
    fisher_window: int = Field(32, ge=1, le=10_000)
    fisher_layers: Literal["auto"] | list[str] = "auto"
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS, description="0 = only at cancel and at the end")
    # data
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    finetune: FinetuneSpec | None = Field(
        None, description="the pretrained model (and LoRA) for kinds finetune, classify and instruct"
    )
    classify: ClassifySpec | None = Field(None, description="data and labels (kind='classify')")
    instruct: InstructSpec | None = Field(None, description="data and evaluation (kind='instruct')")

    @property
    def primary_metric(self) -> str:
        """The metric this task is judged by (``server.metrics_registry``)."""
        if self.kind == "classify":
            return (self.classify or ClassifySpec()).primary_metric
        if self.kind == "instruct":
            return "val_exact_match"
        return "val_loss"

    @property
    def sequences_per_step(self) -> int:
        """The global batch in sequences: per-device micro-batch × accumulation × devices."""
        return self.batch_size * self.grad_accum * self.devices_per_run

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.context

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        name = data["preset"]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
        preset = PRESETS[name]
        return {**{key: getattr(preset, key) for key in _PRESET_FIELDS}, **data}

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.tokens is not None:
            steps = math.ceil(self.tokens / self.tokens_per_step)
            # A dumped spec carries both (steps computed); only a disagreeing pair is an error.
            if "steps" in self.model_fields_set and self.steps != steps:
                raise ValueError(
                    f"give task.tokens or task.steps, not both (tokens give {steps} steps, "
                    f"steps is {self.steps})"
                )
            if steps > MAX_STEPS:
                raise ValueError(f"task.tokens gives {steps} steps at this batch; the limit is {MAX_STEPS}")
            self.steps = steps
        if self.arch == "llama" and (self.d_model // self.n_head) % 2:
            raise ValueError("llama needs an even head width (d_model / n_head) for rotary embeddings")
        if self.kind == "pretrain":
            if self.d_model % self.n_head:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
            if self.finetune is not None:
                raise ValueError("finetune must be null when kind is 'pretrain'")
        elif self.finetune is None:
            raise ValueError(f"finetune (with at least 'model') is required when kind is '{self.kind}'")
        if self.kind == "classify" and self.classify is None:
            self.classify = ClassifySpec()
        if self.kind == "instruct" and self.instruct is None:
            self.instruct = InstructSpec()
        if self.kind != "classify" and self.classify is not None:
            raise ValueError("classify must be null unless kind is 'classify'")
        if self.kind != "instruct" and self.instruct is not None:
            raise ValueError("instruct must be null unless kind is 'instruct'")
        builtin = self.finetune.model if self.finetune is not None else ""
        if builtin.startswith(BUILTIN_PREFIX):
            fits = {"classify": BUILTIN_MODELS, "instruct": ("builtin:tiny-gpt2",)}.get(self.kind, ())
            if builtin not in fits:
                raise ValueError(f"finetune.model {builtin!r} cannot serve kind '{self.kind}'")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        return self


_TASK_METRICS = {
    "classify": {"val_accuracy", "val_f1", "val_mcc"},
    "instruct": {"val_exact_match"},
}


def _scalar(value: Any) -> Any:
    """Hyperparameter values are finite numbers, booleans, short strings or null; nothing nested."""
    if value is None:
        return value
    if isinstance(value, bool | str):
        if isinstance(value, str) and len(value) > 200:
            raise ValueError("string values are limited to 200 characters")
        return value
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    raise ValueError(f"must be a number, boolean, string or null, got {type(value).__name__}")


HyperValue = Annotated[
    Any, AfterValidator(_scalar), Field(json_schema_extra={"type": ["number", "boolean", "string", "null"]})
]


def _registry() -> Any:
    """The optimizer registry, imported on first use: it imports torch, which the Celery app (it
    imports this contract) must not load before its pool is set up."""
    from dykaf.baselines import registry

    return registry


class OptimizerSpec(StrictModel):
    """One optimizer configuration; ``sweep`` lists values to try per hyperparameter (grid)."""

    name: str = Field(..., description="a registry name, e.g. adamw, soap, dykaf, muon, shampoo")
    label: str | None = Field(None, description=f"display name ({NAME_RULE}); defaults to the optimizer name")
    hyperparameters: dict[str, HyperValue] = Field(default_factory=dict)
    sweep: dict[str, Annotated[list[HyperValue], Field(min_length=1, max_length=MAX_SWEEP_VALUES)]] = Field(
        default_factory=dict, description="hyperparameter -> values; the grid over all of them is run"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        registry = _registry()
        if value not in registry.OPTIMIZER_NAMES:
            accepted = ", ".join(registry.OPTIMIZER_NAMES)
            raise ValueError(f"unknown optimizer {value!r}; accepted: {accepted}")
        return value

    @field_validator("label")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        if value is not None and not valid_name(value):
            raise ValueError(f"label must be {NAME_RULE}")
        return value

    @field_validator("hyperparameters")
    @classmethod
    def _hyperparameters_valid(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        registry = _registry()
        name = info.data.get("name")
        if name in registry.OPTIMIZER_NAMES:
            registry.validate_hyperparameters(name, value)
        return value

    @field_validator("sweep")
    @classmethod
    def _sweep_valid(cls, value: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        registry = _registry()
        name = info.data.get("name")
        base = info.data.get("hyperparameters")
        if name not in registry.OPTIMIZER_NAMES or base is None:
            return value
        for key, values in value.items():
            for item in values:
                try:
                    registry.validate_hyperparameters(name, {**base, key: item})
                except ValueError as exc:
                    raise ValueError(f"{key}={item!r}: {exc}") from None
        return value

    @property
    def display(self) -> str:
        return self.label or self.name

    def sweep_size(self) -> int:
        """Number of sweep points, computed without building them (a grid can be astronomically
        large: 11 hyperparameters x 16 values is 16**11 points, which must be refused, not built)."""
        return math.prod(len(values) for values in self.sweep.values())

    def sweep_points(self) -> list[dict[str, Any]]:
        """Every combination of the sweep values (``[{}]`` when there is no sweep)."""
        if not self.sweep:
            return [{}]
        keys = sorted(self.sweep)
        return [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.sweep[k] for k in keys))
        ]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class RunSpec(StrictModel):
    """Everything one training run needs; produced by ``JobSpec.expand``."""

    job_name: str
    run_key: str = Field(..., description="unique within the job, e.g. 'adamw[lr=0.001]-s0'")
    group: str = Field(..., description="the OptimizerSpec's display name (sweep points share it)")
    label: str = Field(..., description="group plus the sweep point")
    optimizer: str
    hyperparameters: dict[str, Any]
    sweep_point: dict[str, Any] = Field(default_factory=dict)
    seed: int
    device: Literal["auto", "cpu", "cuda"] = "auto"
    target_loss: float | None = None
    target_metric: TargetMetric | None = None
    task: TaskSpec


class JobSpec(StrictModel):
    """A comparison: one task, several optimizers (with optional sweeps), several seeds."""

    name: str = Field("comparison", description=f"a short name for the job: {NAME_RULE}")
    task: TaskSpec = Field(default_factory=TaskSpec)
    optimizers: list[OptimizerSpec] = Field(..., min_length=1, max_length=64)
    seeds: list[int] = Field([0], min_length=1, max_length=MAX_SEEDS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    target_loss: float | None = Field(
        None, gt=0, description="report steps/seconds to reach this val loss (= target_metric val_loss <= x)"
    )
    target_metric: TargetMetric | None = Field(
        None,
        description="report steps/seconds to reach a quality, e.g. "
        "{name: val_accuracy, op: '>=', value: 0.85}",
    )
    sweep_selection: Literal["all_seeds", "first_seed"] = Field(
        "all_seeds",
        description="all_seeds: every sweep point runs on every seed; first_seed: sweep on the first seed, "
        "then run the remaining seeds at each optimizer's best point (equal tuning budget per optimizer)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return check_seeds(value)

    @model_validator(mode="after")
    def _target(self) -> JobSpec:
        if self.target_loss is not None and self.target_metric is not None:
            raise ValueError("give target_loss or target_metric, not both")
        if self.target_metric is not None:
            name = self.target_metric.name
            available = {"val_loss", "val_ppl", "train_loss"} | _TASK_METRICS.get(self.task.kind, set())
            if name not in available:
                raise ValueError(
                    f"target_metric.name {name!r} is not reported by kind '{self.task.kind}'; "
                    f"accepted: {', '.join(sorted(available))}"
                )
        return self

    @property
    def target(self) -> TargetMetric | None:
        """The target as a metric comparison (``target_loss`` x is ``val_loss <= x``)."""
        if self.target_metric is not None:
            return self.target_metric
        if self.target_loss is not None:
            return TargetMetric(name="val_loss", op="<=", value=self.target_loss)
        return None

    @model_validator(mode="after")
    def _limits(self) -> JobSpec:
        labels = [opt.display for opt in self.optimizers]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"optimizer labels must be unique; repeated: {', '.join(duplicates)} (set 'label')"
            )
        total = self.run_count()
        if total > MAX_RUNS_PER_JOB:
            raise ValueError(
                f"the job expands to {total} runs (optimizers x sweep points x seeds); the limit is "
                f"{MAX_RUNS_PER_JOB}"
            )
        return self

    def run_count(self) -> int:
        """Number of runs the job will execute (both stages for ``first_seed`` selection)."""
        points = sum(opt.sweep_size() for opt in self.optimizers)
        if self.sweep_selection == "first_seed":
            return points + len(self.optimizers) * (len(self.seeds) - 1)
        return points * len(self.seeds)

    def _run(self, opt: OptimizerSpec, point: dict[str, Any], seed: int) -> RunSpec:
        hyper = {**opt.hyperparameters, **point}
        registry = _registry()
        if opt.name in registry.OPTIMIZER_NAMES:
            hyper = registry.validate_hyperparameters(opt.name, hyper)
        suffix = ",".join(f"{k}={_format_value(v)}" for k, v in sorted(point.items()))
        label = f"{opt.display}[{suffix}]" if suffix else opt.display
        return RunSpec(
            job_name=self.name,
            run_key=f"{label}-s{seed}",
            group=opt.display,
            label=label,
            optimizer=opt.name,
            hyperparameters=hyper,
            sweep_point=dict(point),
            seed=seed,
            device=self.device,
            target_loss=self.target_loss,
            target_metric=self.target,
            task=self.task,
        )

    def expand(self, seeds: list[int] | None = None) -> list[RunSpec]:
        """Every optimizer × sweep point × seed (the first stage only for ``first_seed`` selection)."""
        if seeds is None:
            seeds = self.seeds[:1] if self.sweep_selection == "first_seed" else self.seeds
        return [
            self._run(opt, point, seed)
            for opt in self.optimizers
            for point in opt.sweep_points()
            for seed in seeds
        ]

    def expand_selected(self, chosen: dict[str, dict[str, Any]]) -> list[RunSpec]:
        """Second stage of ``first_seed`` selection: the remaining seeds at each group's chosen point.

        ``chosen`` maps an optimizer's display name to its winning sweep point.
        """
        runs = []
        for opt in self.optimizers:
            point = chosen.get(opt.display, {})
            runs.extend(self._run(opt, point, seed) for seed in self.seeds[1:])
        return runs


# Summary key that picks a sweep winner (lower is better).
DEFAULT_SELECTION_METRIC = "val_loss"


@dataclass(frozen=True)
class SweepResult:
    """What sweep-winner selection needs of one ended run."""

    group: str
    sweep_point: Mapping[str, Any]
    status: str
    summary: Mapping[str, Any] | None


def selection_score(
    status: str, summary: Mapping[str, Any] | None, primary: str = DEFAULT_SELECTION_METRIC
) -> float:
    """A run's score for sweep selection (lower wins): the final value of the job's primary metric
    (``TaskSpec.primary_metric``), negated where higher is better, if the run succeeded with a finite
    one; +inf otherwise (a diverged or failed point never wins)."""
    value = (summary or {}).get(summary_key(primary))
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if status != RunStatus.SUCCEEDED or not ok:
        return math.inf
    return -float(value) if metric(primary).higher_is_better else float(value)


def sweep_winners(
    results: Iterable[SweepResult], primary: str = DEFAULT_SELECTION_METRIC
) -> dict[str, dict[str, Any]]:
    """Each group's winning sweep point by ``primary`` (the first seen among equal scores, so runs in
    index order give a deterministic answer; a group whose points all failed keeps its first point)."""
    chosen: dict[str, dict[str, Any]] = {}
    best: dict[str, float] = {}
    for result in results:
        score = selection_score(result.status, result.summary, primary)
        if result.group not in chosen or score < best[result.group]:
            chosen[result.group] = dict(result.sweep_point)
            best[result.group] = score
    return chosen


def task_schema() -> dict[str, Any]:
    """JSON schema of ``TaskSpec`` with defaults and descriptions (served by ``/api/v1/tasks``)."""
    return TaskSpec.model_json_schema()


def job_schema() -> dict[str, Any]:
    """JSON schema of ``JobSpec``."""
    return JobSpec.model_json_schema()


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted field path, the message, and the offending input if short."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(job)"
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        shown = ""
        if error["type"] != "missing" and isinstance(given, str | int | float | bool):
            text = repr(given)
            shown = f" (got {text})" if len(text) <= 60 else ""
        lines.append(f"{path}: {message}{shown}")
    return "\n".join(lines)


def parse_job(data: Any) -> JobSpec:
    """Validate a mapping (parsed YAML or JSON) into a ``JobSpec``; raises ``ValidationError``."""
    return JobSpec.model_validate(data)
