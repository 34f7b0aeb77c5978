"""Loaders: batches of packed rows for each rank, resumable from a plain-int state.

Without streaming, epoch ``e`` visits the training blocks in a seeded order, rank ``r`` of ``w``
taking a disjoint stride of it; evaluation batches are finite and the same on every pass. With
streaming, blocks pass through a seeded shuffle buffer and resuming replays the stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from flashlm.data.packing import PackedSplit, StreamingData, make_batch
from flashlm.data.sources import DataError
from flashlm.data.tokenizer import token_dtype
from flashlm.validation import check


def _rows(split: PackedSplit, rows) -> dict[str, Any]:
    return make_batch(split.blocks[rows], split.starts[rows], None if split.labels is None else split.labels[rows])


def _check_rank(batch_size, rank, world_size):
    check(batch_size >= 1, "batch_size", batch_size, "must be >= 1", DataError)
    check(world_size >= 1, "world_size", world_size, "must be >= 1", DataError)
    check(0 <= rank < world_size, "rank", rank, f"must be in [0, world_size={world_size})", DataError)


class TrainLoader:
    """Infinite training batches over a ``PackedSplit``.

    Epoch ``e`` visits the blocks in the order ``permutation(seed, e)``. The processes consume
    that order together, ``world_size * batch_size`` positions per step: rank ``r`` takes
    positions ``consumed + r + world_size * i`` for ``i < batch_size``. An epoch ends when fewer
    than one step's positions are left (the tail is dropped), so every rank gets the same
    number of batches. The state is the epoch and the positions consumed, which do not depend on
    how many processes consumed them: a run resumed on another number of processes continues
    with the next unconsumed block.
    """

    def __init__(self, split: PackedSplit, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        _check_rank(batch_size, rank, world_size)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.step_positions = world_size * batch_size
        self.batches_per_epoch = len(split) // self.step_positions
        if self.batches_per_epoch == 0:
            raise DataError(f"the training split packs into {len(split)} blocks, fewer than "
                            f"batch_size * world_size = {batch_size * world_size}: add data or shrink the batch")
        self.epoch, self.consumed = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, 1, self.epoch]).permutation(len(self.split))
            self._order_epoch, self._order = self.epoch, perm
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.consumed + self.step_positions > len(self.split):  # past batches_per_epoch steps
            self.epoch, self.consumed = self.epoch + 1, 0
        start = self.consumed + self.rank
        rows = self._epoch_order()[start : start + self.step_positions : self.world_size]
        self.consumed += self.step_positions
        return _rows(self.split, rows)

    def state_dict(self) -> dict[str, int]:
        """The data position after the batches returned so far, and what it depends on."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "n_blocks": len(self.split)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        _check_same(state, self.state_dict(), ("seed", "batch_size", "n_blocks"))
        consumed = state.get("consumed")
        if consumed is None:  # a state saved before positions were recorded: batches per rank
            consumed = int(state["batch"]) * self.batch_size * int(state.get("world_size", self.world_size))
        self.epoch, self.consumed = int(state["epoch"]), int(consumed)


def _check_same(saved, current, keys):
    for key in keys:
        if key in saved and saved[key] != current[key]:
            raise DataError(f"the data state was saved with {key}={saved[key]} but this loader has "
                            f"{key}={current[key]}: it would not continue the same batches")


class EvalLoader:
    """Finite evaluation batches: rank ``r`` of ``w`` takes blocks ``r, r + w, ...`` of the
    held-out split (cut to a multiple of ``w``, so every rank runs the same number of
    batches); the last batch may be smaller. Iterating again gives the same batches."""

    def __init__(self, split: PackedSplit, *, batch_size: int, rank: int = 0, world_size: int = 1):
        _check_rank(batch_size, rank, world_size)
        n = len(split) // world_size * world_size
        if n == 0:
            raise DataError(f"the eval split packs into {len(split)} blocks, fewer than world_size="
                            f"{world_size}: raise eval_fraction / eval_docs")
        self.split, self.batch_size = split, batch_size
        self.rows = np.arange(rank, n, world_size)

    def __len__(self):
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(0, len(self.rows), self.batch_size):
            yield _rows(self.split, self.rows[i : i + self.batch_size])


class StreamingTrainLoader:
    """Infinite training batches from ``StreamingData`` for one rank: documents are packed as
    they arrive, blocks pass through a shuffle buffer seeded by (seed, rank), and the stream
    starts over (epoch + 1) when it ends. Resuming replays the stream up to the saved batch."""

    def __init__(self, data: StreamingData, *, batch_size: int, rank: int = 0, world_size: int = 1):
        _check_rank(batch_size, rank, world_size)
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size
        self.batch = 0
        self._blocks = None

    def _block_stream(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        s, cfg = self.data.seq_len, self.data.config
        rng = np.random.default_rng([cfg.seed, 2, self.rank])
        buffer, tokens, starts = [], np.zeros(0, token_dtype(self.data.tokenizer)), np.zeros(0, bool)
        epoch = 0
        while True:
            n_docs = 0
            for doc in self.data.documents(rank=self.rank, world_size=self.world_size):
                n_docs += 1
                tokens = np.concatenate([tokens, doc])
                starts = np.concatenate([starts, np.arange(len(doc)) == 0])
                n = len(tokens) // s * s
                for block in zip(tokens[:n].reshape(-1, s), starts[:n].reshape(-1, s)):
                    # A full buffer swaps the new block for a random one it holds.
                    if len(buffer) < cfg.shuffle_buffer:
                        buffer.append(block)
                        continue
                    i = int(rng.integers(len(buffer)))
                    yield buffer[i]
                    buffer[i] = block
                tokens, starts = tokens[n:], starts[n:]
            if n_docs == 0:
                raise DataError(f"path={cfg.path!r}: rank {self.rank} of {self.world_size} gets no "
                                f"training documents from the stream (epoch {epoch})")
            epoch += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._blocks is None:
            self._blocks = self._block_stream()
            for _ in range(self.batch * self.batch_size):
                next(self._blocks)
        rows = [next(self._blocks) for _ in range(self.batch_size)]
        self.batch += 1
        return make_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))

    def state_dict(self) -> dict[str, int]:
        cfg = self.data.config
        return {"batch": self.batch, "seed": cfg.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle_buffer": cfg.shuffle_buffer}

    def load_state_dict(self, state: dict[str, int]) -> None:
        _check_same(state, self.state_dict(), ("seed", "batch_size", "world_size", "shuffle_buffer"))
        self.batch, self._blocks = int(state["batch"]), None


def build_train_loader(data, *, batch_size: int, rank: int = 0, world_size: int = 1):
    """An infinite, resumable iterator of training batches for this rank."""
    if isinstance(data, StreamingData):
        return StreamingTrainLoader(data, batch_size=batch_size, rank=rank, world_size=world_size)
    return TrainLoader(data.train, batch_size=batch_size, seed=data.config.seed, rank=rank, world_size=world_size)


def build_eval_loader(data, *, batch_size: int, rank: int = 0, world_size: int = 1) -> EvalLoader:
    """A re-iterable loader over this rank's share of the held-out blocks."""
    if data.eval is None or len(data.eval) == 0:
        cfg = data.config
        raise DataError(f"eval_fraction={cfg.eval_fraction!r}, eval_docs={cfg.eval_docs!r}: no held-out "
                        "blocks to evaluate on; hold out documents for evaluation")
    return EvalLoader(data.eval, batch_size=batch_size, rank=rank, world_size=world_size)
