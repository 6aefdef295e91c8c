"""Batches for language modelling, identical for every optimizer given a seed.

The training token stream is cut into non-overlapping windows of ``context + 1`` tokens (inputs and
shifted targets). Each epoch visits every window once in an order drawn from a ``torch.Generator``
seeded by (seed, epoch) and by nothing else, so the batch at a given position of the stream depends
only on the data, the seed and the position: every optimizer sees the same batches in the same order,
and a resumed run continues exactly where it stopped from the step count alone. The validation set is
a fixed list of windows, the same for every run.
"""

from __future__ import annotations

import torch


def _epoch_seed(seed: int, epoch: int) -> int:
    """Mix seed and epoch into one 63-bit generator seed (distinct for distinct pairs in practice)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    return value >> 1


class WindowBatches:
    """Random-order, without-replacement training windows; ``batch(index)`` is a pure function."""

    def __init__(self, tokens: torch.Tensor, context: int, batch_size: int, seed: int) -> None:
        self.tokens = tokens
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // context
        if self.n_windows < 1:
            raise ValueError(
                f"the training split has {len(tokens)} tokens, too few for one window of {context + 1}; "
                "use a larger corpus or a shorter context"
            )
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._order = torch.randperm(self.n_windows, generator=generator)
            self._epoch = epoch
        return self._order

    def window_indices(self, index: int) -> torch.Tensor:
        """Window numbers making up micro-batch ``index`` of the stream."""
        out = torch.empty(self.batch_size, dtype=torch.int64)
        for slot in range(self.batch_size):
            position = index * self.batch_size + slot
            epoch, offset = divmod(position, self.n_windows)
            out[slot] = self._permutation(epoch)[offset]
        return out

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, context) int64, for micro-batch ``index``."""
        starts = self.window_indices(index) * self.context
        rows = torch.stack([self.tokens[s : s + self.context + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]


def validation_batches(
    tokens: torch.Tensor, context: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` fixed validation micro-batches, evenly spread over the validation split."""
    n_windows = (len(tokens) - 1) // context
    if n_windows < 1:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, too few for one window of {context + 1}; "
            "raise corpus.val_fraction or shorten the context"
        )
    wanted = min(n_windows, max_batches * batch_size)
    # Spread the windows over the whole split rather than taking its first part.
    chosen = torch.linspace(0, n_windows - 1, wanted).round().long().unique()
    batches = []
    for first in range(0, len(chosen), batch_size):
        starts = chosen[first : first + batch_size] * context
        rows = torch.stack([tokens[s : s + context + 1] for s in starts.tolist()]).long()
        batches.append((rows[:, :-1], rows[:, 1:]))
    return batches
