"""Labelled examples for classify/instruct tasks: a demo built in code, a Hugging Face dataset (hub id
or local dataset directory), or local CSV/TSV/JSONL/Parquet files, read through ``datasets`` so that
split slicing (``train[:90%]``) works the same everywhere.

Errors name what is wrong in the user's terms (the split that does not exist and the ones that do,
the field that is missing and the columns there are), because they end a run and are shown as its
reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.jobs.paths import confine_path
from server.jobs.spec import DatasetSpec, looks_like_local_path
from worker.lm.demos import demo_splits

_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _split_base(split: str) -> str:
    return split.split("[", 1)[0]


def _load_file_split(path: Path, split: str) -> Any:
    from datasets import load_dataset

    if path.is_dir():
        files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix.lower() in _FORMATS}
        if not files:
            raise FileNotFoundError(f"{path} holds no .csv/.tsv/.jsonl/.json/.parquet file")
    elif path.is_file():
        if path.suffix.lower() not in _FORMATS:
            raise ValueError(f"{path.name}: unsupported format; use .csv .tsv .jsonl .json or .parquet")
        files = {"train": path}
    else:
        raise FileNotFoundError(f"data path {path} does not exist")
    base = _split_base(split)
    if base not in files:
        raise ValueError(f"split {base!r} does not exist in {path}; available: {', '.join(sorted(files))}")
    suffixes = {p.suffix.lower() for p in files.values()}
    if len({_FORMATS[s] for s in suffixes}) > 1:
        raise ValueError(f"{path}: mixed file formats {sorted(suffixes)}")
    suffix = next(iter(suffixes))
    kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    data_files = {name: str(p) for name, p in files.items()}
    return load_dataset(_FORMATS[suffix], data_files=data_files, split=split, **kwargs)


def _load_hf_split(name: str, config: str | None, split: str) -> Any:
    from datasets import load_dataset, load_from_disk

    if looks_like_local_path(name):
        path = confine_path(name)
        if (path / "dataset_dict.json").exists():
            splits = load_from_disk(str(path))
            base = _split_base(split)
            if base not in splits:
                raise ValueError(f"split {base!r} does not exist in {name}; available: {', '.join(splits)}")
            if base != split:
                raise ValueError(f"split slicing is not supported for a saved dataset ({split!r})")
            return splits[base]
        name = str(path)
    try:
        return load_dataset(name, config, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise ValueError(f"split {_split_base(split)!r} does not exist in {name}: {exc}") from None
        raise


def load_split(spec: DatasetSpec, kind: str, which: str) -> list[dict[str, Any]]:
    """The examples of ``which`` (``"train"`` or ``"validation"``) as a list of records, capped by
    ``max_train_examples`` / ``max_val_examples``."""
    split = spec.train_split if which == "train" else spec.validation_split
    cap = spec.max_train_examples if which == "train" else spec.max_val_examples
    if spec.source == "demo":
        name = spec.demo or ("stdlib_module" if kind == "classify" else "arithmetic")
        splits = demo_splits(name, spec.demo_examples)
        if split not in splits:
            raise ValueError(f"split {split!r} does not exist in demo {name!r}; available: train, validation")
        records = splits[split]
    elif spec.source == "file":
        assert spec.path is not None
        records = _load_file_split(confine_path(spec.path), split).to_list()
    else:
        assert spec.hf_name is not None
        records = _load_hf_split(spec.hf_name, spec.hf_config, split).to_list()
    if not records:
        raise ValueError(f"split {split!r} is empty")
    return records[:cap] if cap is not None else records


def require_fields(records: list[dict[str, Any]], fields: dict[str, str | None], split: str) -> None:
    """Every named field (``{"label_field": "label", ...}``) must be a column of the split."""
    columns = set(records[0])
    for option, name in fields.items():
        if name is not None and name not in columns:
            raise ValueError(
                f"{option} {name!r} is not a field of split {split!r}; fields: {', '.join(sorted(columns))}"
            )


class ExampleBatches:
    """Mini-batches of examples as a pure function of (seed, index), like ``WindowBatches``: batch
    ``i`` holds positions ``[i*B, (i+1)*B)`` of an endless stream of per-epoch permutations, so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, items: list[Any], collate: Any, batch_size: int, seed: int) -> None:
        import torch

        if not items:
            raise ValueError("no training examples")
        self.items, self.collate, self.batch_size, self.seed = items, collate, batch_size, seed
        self._torch = torch
        self._perms: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = self._torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = self._torch.randperm(len(self.items), generator=gen).tolist()
        return self._perms[epoch]

    def batch(self, index: int) -> Any:
        n = len(self.items)
        chosen = []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, offset = divmod(position, n)
            chosen.append(self.items[self._permutation(epoch)[offset]])
        return self.collate(chosen)


def fixed_batches(items: list[Any], collate: Any, batch_size: int) -> list[Any]:
    """The validation set in order, every example once."""
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
