"""Batches for language modelling, identical for every optimizer given a seed.

Windows. The training token space (all training shards read as one array, see ``worker.lm.shards``)
is cut into non-overlapping windows of ``context + 1`` tokens (inputs and shifted targets; window
``w`` starts at token ``w · context``). Training runs in epochs over these fixed windows, each epoch
visiting every window once in a shuffled order. We chose epochs over fixed windows rather than random
offsets because (1) every token is trained on exactly once per epoch, so "tokens seen" means what it
says and no part of a multi-billion-token corpus is skipped or repeated by chance, and (2) a window is
one integer, so a batch, a resume point or a test can name the exact tokens it used.

Order. The shuffle of epoch ``e`` is a keyed pseudo-random permutation of the window numbers (a
four-round Feistel network over the next power of four, walking the cycle until the value falls
inside the range) computed on demand for the positions asked for: nothing of size "number of windows"
is ever stored, so memory does not grow with the corpus, and the window at stream position ``p`` is a
pure function of (seed, p). Every optimizer therefore sees the same batches in the same order, and a
resumed run continues exactly from the step count alone. The validation set is a fixed list of windows
spread evenly over the validation token space, the same for every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.lm.shards import TokenSpace

_ROUNDS = 4


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective 64-bit hash (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _round_keys(seed: int, epoch: int) -> list[np.uint64]:
    """One 64-bit key per Feistel round, distinct for distinct (seed, epoch) pairs in practice."""
    words = np.array([(seed * _ROUNDS + r) % 2**64 for r in range(_ROUNDS)], dtype=np.uint64)
    keyed = _mix(_mix(words) ^ np.uint64(epoch % 2**64))
    return list(keyed)


def permute(indices: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A bijection of ``range(n)`` keyed by (seed, epoch), applied to ``indices`` (all < n)."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(seed, epoch)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & low
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & low)
        return (left << half) | right

    out = feistel(np.asarray(indices, dtype=np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: the domain is < 4n, so this ends after a few passes
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def as_token_space(tokens: Any) -> TokenSpace:
    return tokens if isinstance(tokens, TokenSpace) else TokenSpace([tokens])


class WindowBatches:
    """Shuffled, without-replacement training windows; ``batch(index)`` is a pure function."""

    def __init__(self, tokens: Any, context: int, batch_size: int, seed: int) -> None:
        self.tokens = as_token_space(tokens)
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.n_windows = (len(self.tokens) - 1) // context
        if self.n_windows < 1:
            raise ValueError(
                f"the training split has {len(self.tokens)} tokens, too few for one window of "
                f"{context + 1}; use a larger corpus or a shorter context"
            )

    def window_indices(self, index: int) -> torch.Tensor:
        """Window numbers making up micro-batch ``index`` of the stream."""
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n_windows)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = permute(offsets[chosen], self.n_windows, self.seed, int(epoch))
        return torch.from_numpy(out)

    def windows(self, window_numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given windows, each (len, context) int64."""
        starts = (window_numbers * self.context).tolist()
        rows = torch.from_numpy(self.tokens.gather(starts, self.context + 1))
        return rows[:, :-1], rows[:, 1:]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, context) int64, for micro-batch ``index``."""
        return self.windows(self.window_indices(index))


def validation_batches(
    tokens: Any, context: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` fixed validation micro-batches, evenly spread over the validation split."""
    space = as_token_space(tokens)
    n_windows = (len(space) - 1) // context
    if n_windows < 1:
        raise ValueError(
            f"the validation split has {len(space)} tokens, too few for one window of {context + 1}; "
            "raise corpus.val_fraction or shorten the context"
        )
    wanted = min(n_windows, max_batches * batch_size)
    # Spread the windows over the whole split rather than taking its first part.
    chosen = torch.linspace(0, n_windows - 1, wanted).round().long().unique()
    batches = []
    for first in range(0, len(chosen), batch_size):
        starts = (chosen[first : first + batch_size] * context).tolist()
        rows = torch.from_numpy(space.gather(starts, context + 1))
        batches.append((rows[:, :-1], rows[:, 1:]))
    return batches
