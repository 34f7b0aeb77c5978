"""Packing: documents (pretraining) and chat examples (SFT) into rows of ``seq_len`` tokens.

Both producers end in the same ``PackedSplit`` and the same batch (``make_batch``):

- documents (``pack``): concatenated into one stream, each followed by its EOS, and cut into
  blocks of ``seq_len``; the final partial block is dropped. A document cut by a block edge
  continues in the next block as a new segment starting at position 0.
- SFT examples (``pack_examples``): placed whole, in a seeded order; a row is closed when the
  next example does not fit and its tail is padding (a segment of its own with no loss).

``prepare_data`` picks the producer from the data config (streaming, documents or SFT), holds
out documents or examples for evaluation (seeded, before packing) and returns ``PackedData``
(``SFTData``) or ``StreamingData``.

A batch is a dict (B = batch_size, S = seq_len)::

    input_ids     (B, S) int64  token ids; the model shifts them for next-token targets
    position_ids  (B, S) int64  0 at the start of every segment (document piece) of a row
    doc_ids       (B, S) int64  segment index within its row: 0, 0, ..., 1, 1, ..., 2, ...
    cu_seqlens    (N+1,) int32  FlashAttention varlen offsets of the N segments of the batch
                                flattened to B*S tokens (rows never share a segment)
    max_seqlen    int           longest segment in the batch
    labels        (B, S) int64  SFT batches only: the targets, -100 where there is no loss

``position_ids`` restart inside a row, so they belong with document-masked attention
(``doc_ids`` / ``cu_seqlens``); a model that attends across documents uses ``arange(S)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashlm.data.chat import Example, fit_to_context, load_examples, tokenize_record
from flashlm.data.documents import TokenizedDocs, load_or_tokenize
from flashlm.data.retrieval import plant_retrieval
from flashlm.data.sources import DataError, open_dataset, resolve_files
from flashlm.data.tokenizer import TOKENIZE_BATCH, token_dtype, tokenize_fn
from flashlm.model.loss import IGNORE_INDEX
from flashlm.recipe import DataConfig
from flashlm.validation import check

logger = logging.getLogger(__name__)


@dataclass
class PackedSplit:
    """Blocks of one split: ``blocks[i]`` is a row of token ids, ``starts[i, j]`` is True
    where a document begins at column ``j``; SFT splits also carry the targets."""

    blocks: np.ndarray  # (n_blocks, seq_len) uint16/uint32
    starts: np.ndarray  # (n_blocks, seq_len) bool
    n_docs: int
    n_tokens: int  # tokens of the split's documents, the dropped tail included
    labels: np.ndarray | None = None  # (n_blocks, seq_len) int32, -100 where there is no loss
    retrieval_blocks: int = 0  # blocks given a synthetic retrieval (flashlm.data.retrieval)

    def __len__(self):
        return len(self.blocks)


def pack(docs: list[np.ndarray] | TokenizedDocs, order, seq_len: int) -> PackedSplit:
    """Concatenate documents ``order`` (each ending in EOS) and cut them into blocks."""
    if isinstance(docs, TokenizedDocs):
        pieces = [docs.tokens[docs.offsets[i] : docs.offsets[i + 1]] for i in order]
    else:
        pieces = [docs[i] for i in order]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.cumsum(lengths) - lengths] = True
    n = len(stream) // seq_len * seq_len
    return PackedSplit(stream[:n].reshape(-1, seq_len), starts[:n].reshape(-1, seq_len),
                       len(pieces), len(stream))


def pack_examples(examples: list[Example], order, seq_len: int, pad_token_id: int) -> PackedSplit:
    """Whole examples ``order`` packed into rows of ``seq_len``, each row's tail padded."""
    rows: list[list[Example]] = []
    used = seq_len
    for i in order:
        ex = examples[i]
        if used + len(ex.input_ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.input_ids)
    blocks = np.full((len(rows), seq_len), pad_token_id, dtype=np.uint32)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int32)
    starts = np.zeros((len(rows), seq_len), dtype=bool)
    for r, row in enumerate(rows):
        col = 0
        for ex in row:
            n = len(ex.input_ids)
            blocks[r, col:col + n] = ex.input_ids
            labels[r, col + 1:col + n] = ex.labels[1:]  # a first token is never predicted from the example before
            starts[r, col] = True
            col += n
        starts[r, col % seq_len] = True  # the padding is a segment of its own (col 0 is a start anyway)
    n_tokens = sum(len(examples[i].input_ids) for i in order)
    return PackedSplit(blocks, starts, len(order), n_tokens, labels)


def split_documents(n_docs: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train order, eval indices): a seeded hold-out, then the training documents in a
    seeded order. Eval indices are sorted so evaluation reads the corpus in its own order."""
    n_eval = cfg.eval_docs if cfg.eval_docs is not None else (
        max(1, round(cfg.eval_fraction * n_docs)) if cfg.eval_fraction > 0 else 0)
    if n_eval >= n_docs:
        raise DataError(f"eval_docs={cfg.eval_docs!r}, eval_fraction={cfg.eval_fraction!r}: would hold out "
                        f"{n_eval} of the corpus's {n_docs} documents, leaving none to train on")
    perm = np.random.default_rng([cfg.seed, 0]).permutation(n_docs)
    return perm[n_eval:], np.sort(perm[:n_eval])


@dataclass
class PackedData:
    """A tokenized, split and packed corpus (``prepare_data`` without streaming)."""

    config: DataConfig
    seq_len: int
    eos_token_id: int
    train: PackedSplit
    eval: PackedSplit | None
    from_cache: bool
    cache_entry: Path | None

    def summary(self) -> str:
        ev = self.eval
        held = f"{ev.n_docs} eval docs -> {len(ev)} blocks" if ev is not None else "no eval split"
        cache = f"cache {'hit' if self.from_cache else 'written'}: {self.cache_entry}" if self.cache_entry else "no cache"
        planted = (f" ({self.train.retrieval_blocks} with a synthetic retrieval)"
                   if self.train.retrieval_blocks else "")
        return (f"data {self.config.path}: {self.train.n_docs} train docs, {self.train.n_tokens:,} tokens -> "
                f"{len(self.train)} blocks of {self.seq_len}{planted}; {held}; {cache}")


@dataclass
class SFTData(PackedData):
    """Packed SFT examples (``prepare_sft_data``); the loaders treat it like ``PackedData``."""

    n_examples: int
    n_truncated: int
    n_dropped: int

    def summary(self) -> str:
        train = self.train
        fill = float((train.labels != IGNORE_INDEX).sum()) / train.blocks.size
        held = f"{self.eval.n_docs} held-out examples -> {len(self.eval)} rows" if self.eval else "no eval split"
        cut = (f"{self.n_truncated} truncated to seq_len={self.seq_len} ({self.n_dropped} of them dropped: "
               "no response token left)") if self.config.truncation else "none truncated (truncation off)"
        return (f"sft data {self.config.path}: {self.n_examples} examples, {cut}; {train.n_docs} train examples, "
                f"{train.n_tokens:,} tokens -> {len(train)} rows of {self.seq_len} ({fill:.0%} of tokens carry "
                f"loss); {held}")


class StreamingData:
    """A corpus read lazily through ``datasets`` streaming and tokenized on the fly.

    The first ``eval_docs`` documents are held out and packed at once (``.eval``); the rest
    feed ``StreamingTrainLoader``, which tokenizes only this rank's documents."""

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int):
        self.config, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.eos_token_id = tokenizer.eos_token_id
        self.format, self.files = ("hub", []) if cfg.format == "hub" else resolve_files(cfg.path, cfg.format)
        self.dataset = open_dataset(self.format, self.files, cfg.text_field, cfg.sample_by, streaming=True,
                                     cache_dir=None, hub=(cfg.path, cfg.hub_config, cfg.hub_split))
        n_eval = cfg.eval_docs or 0
        eval_docs = list(self.documents(rank=0, world_size=1, stop=n_eval)) if n_eval else []
        self.eval = pack(eval_docs, range(len(eval_docs)), seq_len) if eval_docs else None
        self.from_cache, self.cache_entry = False, None

    def documents(self, *, rank: int, world_size: int, stop: int | None = None) -> Iterator[np.ndarray]:
        """Tokenized documents (EOS included): the first ``stop`` documents when ``stop`` is
        set, else the training documents ``i`` (counted after the held-out ones) with
        ``i % world_size == rank``."""
        cfg, tokenize = self.config, tokenize_fn(self.tokenizer, self.config.text_field)
        skip = 0 if stop is not None else (cfg.eval_docs or 0)
        dtype = token_dtype(self.tokenizer)
        texts, ids = [], []
        for i, row in enumerate(self.dataset):
            if stop is not None and i >= stop:
                break
            if i >= skip and (i - skip) % world_size == rank:
                texts.append(row[cfg.text_field])
                ids.append(i)
            if len(texts) == TOKENIZE_BATCH:
                yield from (np.asarray(x, dtype) for x in tokenize({cfg.text_field: texts}, ids)["input_ids"])
                texts, ids = [], []
        if texts:
            yield from (np.asarray(x, dtype) for x in tokenize({cfg.text_field: texts}, ids)["input_ids"])

    def summary(self) -> str:
        held = f"{self.eval.n_docs} eval docs -> {len(self.eval)} blocks" if self.eval else "no eval split"
        return f"data {self.config.path}: streaming, blocks of {self.seq_len}; {held}"


def prepare_data(cfg: DataConfig, tokenizer, seq_len: int):
    """Tokenize (or load from cache), split and pack ``cfg``'s corpus into ``seq_len`` blocks.

    Returns ``PackedData``, or ``StreamingData`` when ``cfg.streaming``. Raises ``DataError``
    for bad files, bad settings, or a training split shorter than one block."""
    check(seq_len >= 2, "training.seq_len", seq_len, "must be >= 2", DataError)
    if cfg.kind == "sft":
        return prepare_sft_data(cfg, tokenizer, seq_len)
    if cfg.streaming:
        return StreamingData(cfg, tokenizer, seq_len)
    docs, from_cache, entry = load_or_tokenize(cfg, tokenizer)
    train_order, eval_idx = split_documents(docs.n_docs, cfg)
    if cfg.min_doc_tokens:
        train_order = train_order[np.diff(docs.offsets)[train_order] >= cfg.min_doc_tokens]
    train = pack(docs, train_order, seq_len)
    train.retrieval_blocks = plant_retrieval(train.blocks, train.starts, tokenizer, cfg.retrieval_share, cfg.seed,
                                            cfg.retrieval_kind, cfg.retrieval_max_spans, cfg.retrieval_cue_tokens,
                                            cfg.retrieval_unique_cue)
    if len(train) == 0:
        long_only = f" in documents of at least min_doc_tokens={cfg.min_doc_tokens}" if cfg.min_doc_tokens else ""
        raise DataError(f"path={cfg.path!r}: the training split holds {train.n_tokens} tokens{long_only}, "
                        f"less than one block of seq_len={seq_len}")
    evals = pack(docs, eval_idx, seq_len) if len(eval_idx) else None
    return PackedData(cfg, seq_len, tokenizer.eos_token_id, train, evals, from_cache, entry)


def prepare_sft_data(cfg: DataConfig, tokenizer, seq_len: int) -> SFTData:
    """Read, tokenize, mask, split and pack ``cfg``'s SFT examples into rows of ``seq_len``.

    Raises ``DataError`` for bad files or examples (named by file and line), and for a training
    split with no examples left."""
    records, default_template = load_examples(cfg, tokenizer)
    examples = [tokenize_record(record, where, tokenizer, default_template) for record, where in records]
    n_examples = len(examples)
    examples, truncated, dropped = fit_to_context(examples, seq_len, cfg.truncation)
    if truncated:
        logger.warning("%s: %d of %d examples are longer than seq_len=%d and were truncated (%d dropped)",
                       cfg.path, truncated, n_examples, seq_len, dropped)
    if not examples:
        raise DataError(f"path={cfg.path!r}: no example fits in seq_len={seq_len}")
    train_order, eval_idx = split_documents(len(examples), cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = pack_examples(examples, train_order, seq_len, pad)
    evals = pack_examples(examples, eval_idx, seq_len, pad) if len(eval_idx) else None
    return SFTData(cfg, seq_len, tokenizer.eos_token_id, train, evals, False, None,
                   n_examples=n_examples, n_truncated=truncated, n_dropped=dropped)


def make_batch(blocks: np.ndarray, starts: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """The batch dict of some packed rows (see the module docstring for keys and shapes)."""
    b, s = blocks.shape
    starts = starts.copy()
    starts[:, 0] = True  # a row always opens a segment, a continued document included
    col = np.arange(s)
    seg_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
    flat = np.flatnonzero(starts.reshape(-1))
    cu = np.append(flat, b * s).astype(np.int32)
    batch = {
        "input_ids": torch.from_numpy(blocks.astype(np.int64)),
        "position_ids": torch.from_numpy(col - seg_start),
        "doc_ids": torch.from_numpy(np.cumsum(starts, axis=1) - 1),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(np.diff(cu).max()),
    }
    if labels is not None:
        batch["labels"] = torch.from_numpy(labels.astype(np.int64))
    return batch


def model_inputs(batch: dict[str, Any], document_mask: bool, device: torch.device) -> dict[str, Any]:
    """The model's arguments for a data batch: the batch's labels (SFT) or its inputs as labels,
    and with ``document_mask`` the per-document positions and boundaries (cu_seqlens stays on
    the CPU, where the model validates it)."""
    input_ids = batch["input_ids"].to(device)
    inputs = {"input_ids": input_ids, "labels": batch["labels"].to(device) if "labels" in batch else input_ids}
    if document_mask:
        inputs |= {"position_ids": batch["position_ids"].to(device), "cu_seqlens": batch["cu_seqlens"],
                   "max_seqlen": batch["max_seqlen"]}
    return inputs


def unigram_entropy(data, max_tokens: int | None = None) -> float:
    """Entropy in nats/token of the training tokens' unigram distribution: the loss of a
    model that ignores context. Counts every packed training token of ``PackedData`` (or its
    first ``max_tokens``), or for SFT data the tokens that carry a loss (the answers, which is
    what its loss averages over); for ``StreamingData``, the first ``max_tokens`` (default 10**6)."""
    if isinstance(data, StreamingData):
        limit, parts, n = max_tokens or 10**6, [], 0
        for doc in data.documents(rank=0, world_size=1):
            parts.append(doc)
            n += len(doc)
            if n >= limit:
                break
        tokens = np.concatenate(parts)[:limit]
    elif data.train.labels is not None:
        tokens = data.train.labels[data.train.labels >= 0][:max_tokens]
    else:
        tokens = data.train.blocks.reshape(-1)[:max_tokens]
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())
