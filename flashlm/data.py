"""Training data: load a corpus through ``datasets``, tokenize it once, pack it into blocks.

Public API::

    cfg = DataConfig(path="data/corpus", tokenizer="data/tokenizer", eval_fraction=0.05,
                     seed=0, cache_dir=".cache/data")
    tok = load_tokenizer(cfg.tokenizer)            # transformers.PreTrainedTokenizerFast
    check_tokenizer_fits(tok, model_cfg.vocab_size) # DataError if len(tok) > vocab_size
    data = prepare_data(cfg, tok, seq_len=256)      # PackedData, or StreamingData if streaming
    print(data.summary())                           # documents, tokens, blocks, cache hit or not
    h = unigram_entropy(data)                       # nats/token of the training tokens
    train = build_train_loader(data, batch_size=8, rank=0, world_size=1)
    batch = next(train)                             # infinite, deterministic given cfg.seed
    state = train.state_dict()                      # plain ints: put it in checkpoints
    train.load_state_dict(state)                    # next(train) is the batch after `state`
    for batch in build_eval_loader(data, batch_size=8, rank=0, world_size=1):
        ...                                         # finite, the same batches on every pass
    iter_texts("data/corpus")                       # the raw document strings (tokenizer training)

``DataConfig`` fields (kw_only): ``path`` (file, folder or glob; or a hub dataset name with
``format="hub"``), ``tokenizer`` (tokenizer.json, tokenizer folder or hub name), ``format``
("auto" | "text" | "jsonl" | "parquet" | "arrow" | "hub"), ``text_field``, ``sample_by``
(text files: "document" = one document per file, "paragraph", "line"), ``eval_fraction`` or
``eval_docs`` (held-out documents, chosen before packing), ``streaming``, ``shuffle_buffer``
(streaming only, in blocks), ``cache_dir`` (None turns the token cache off), ``seed``,
``num_proc``, ``hub_config``, ``hub_split``. ``kind="sft"`` reads instruction examples
instead of documents (``flashlm.sft``, with its own ``truncation`` and ``chat_template``).

Packing: each document is tokenized with the tokenizer's own special tokens (none for the
bundled tokenizer, BOS for Llama's) and followed by one EOS token, which belongs to the
document it ends. Documents are concatenated into one stream and cut into blocks of
``seq_len`` tokens; the final partial block is dropped. A document cut by a block edge
continues in the next block as a new segment starting at position 0.

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

Splits and order: without streaming, documents are held out at random (seeded) before
packing; the training documents are packed in a seeded order and every epoch visits the
blocks in a new seeded order, each rank taking a disjoint stride of it. With streaming,
the first ``eval_docs`` documents of the stream are held out, document ``i`` after them goes
to rank ``i % world_size``, and blocks pass through a seeded shuffle buffer.

Caching: tokenized documents are stored under ``cache_dir`` in an entry keyed on the data
files' contents (or a hub dataset's fingerprint), the tokenizer and the read settings; the
split and packing are redone from it in milliseconds, so ``seq_len``, ``seed`` and the eval
settings do not key it. Under Accelerate, call ``prepare_data`` inside
``accelerator.main_process_first()`` so that one process tokenizes and the others read.

Errors (``DataError``, a ``ValueError``) are raised before training and name the problem:
missing or empty data files, a jsonl line without the text field (file and line), text that
is not UTF-8 (file), a tokenizer larger than the model's vocabulary, a corpus too small for
one batch per rank. Finding and validating files is ``flashlm.corpus``'s job; with
streaming, a bad line past the held-out documents is found when the stream reaches it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from flashlm.corpus import DataError, iter_texts, open_dataset, resolve_files

__all__ = [
    "DataConfig", "DataError", "PackedData", "StreamingData", "build_eval_loader", "build_train_loader",
    "check_tokenizer_fits", "iter_texts", "load_tokenizer", "prepare_data", "unigram_entropy",
]

CACHE_VERSION = 1
TOKENIZE_BATCH = 1000  # documents per tokenizer call


@dataclass(kw_only=True)
class DataConfig:
    """Where the corpus is, how to read and tokenize it, and how to split it."""

    path: str
    tokenizer: str
    format: Literal["auto", "text", "jsonl", "parquet", "arrow", "hub"] = "auto"
    text_field: str = "text"
    sample_by: Literal["document", "paragraph", "line"] = "document"
    eval_fraction: float = 0.0
    eval_docs: int | None = None  # a count of held-out documents; overrides eval_fraction
    streaming: bool = False
    shuffle_buffer: int = 1024
    cache_dir: str | None = ".cache/data"
    seed: int = 0
    num_proc: int = 1  # datasets.map processes; the Rust tokenizer is multithreaded already
    hub_config: str | None = None
    hub_split: str = "train"
    kind: Literal["text", "sft"] = "text"  # sft: instruction examples, see flashlm.sft
    truncation: bool = False  # sft: cut an example longer than seq_len (and count it) instead of failing
    chat_template: str | None = None  # sft: a Jinja chat template replacing the tokenizer's own

    def __post_init__(self):
        _check(bool(self.path), "path", self.path, "must name a file, folder, glob or hub dataset")
        _check(bool(self.tokenizer), "tokenizer", self.tokenizer, "must name a tokenizer")
        formats = ("auto", "text", "jsonl", "parquet", "arrow", "hub")
        _check(self.format in formats, "format", self.format, f"must be one of {formats}")
        _check(self.sample_by in ("document", "paragraph", "line"), "sample_by", self.sample_by,
               "must be 'document', 'paragraph' or 'line'")
        _check(bool(self.text_field), "text_field", self.text_field, "must name a field")
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _check(self.eval_docs is None or self.eval_docs >= 0, "eval_docs", self.eval_docs, "must be >= 0")
        _check(not (self.streaming and self.eval_fraction > 0), "eval_fraction", self.eval_fraction,
               "cannot be used with streaming (the stream's length is unknown); set eval_docs")
        _check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        _check(self.num_proc >= 1, "num_proc", self.num_proc, "must be >= 1")
        _check(self.kind in ("text", "sft"), "kind", self.kind, "must be 'text' or 'sft'")
        if self.kind == "text":
            _check(not self.truncation, "truncation", self.truncation, "applies to kind: sft only")
            _check(self.chat_template is None, "chat_template", self.chat_template, "applies to kind: sft only")
        else:
            _check(self.format in ("auto", "jsonl"), "format", self.format, "must be 'jsonl' (or 'auto') for kind: sft")
            _check(not self.streaming, "streaming", self.streaming, "is not supported for kind: sft")


def _check(ok, field, value, why):
    if not ok:
        raise DataError(f"{field}={value!r}: {why}")


def load_tokenizer(spec: str):
    """Load a Hugging Face fast tokenizer from a ``tokenizer.json`` file, a tokenizer folder
    (``save_pretrained`` layout) or a hub name. Returns a ``PreTrainedTokenizerFast``; raises
    ``DataError`` if it cannot be found or has no EOS token (packing needs one)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec)
    if path.is_file():
        config = path.parent / "tokenizer_config.json"
        if path.name == "tokenizer.json" and config.is_file():
            tok = AutoTokenizer.from_pretrained(str(path.parent))
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
            specials = [t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values() if t.special]
            for name in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "<eos>"):
                if name in specials:
                    tok.eos_token = name
                    break
    elif path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path))
    elif spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1:
        raise DataError(f"tokenizer={spec!r}: no such file or folder")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except OSError as e:
            raise DataError(f"tokenizer={spec!r}: not a local file or folder, and not loadable "
                            f"from the hub ({e})") from e
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer={spec!r}: has no eos_token; packing puts one between documents")
    return tok


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """Raise ``DataError`` unless every token id of ``tokenizer`` is below ``vocab_size``."""
    n = len(tokenizer)
    if n > vocab_size:
        raise DataError(
            f"the tokenizer has {n} tokens (len(tokenizer), special tokens included) but the "
            f"model's vocab_size is {vocab_size}: raise model.vocab_size to at least {n} or use a "
            "smaller tokenizer"
        )


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()


def _tokenize_fn(tokenizer, text_field):
    eos = tokenizer.eos_token_id

    def tokenize(batch, indices):
        for text, i in zip(batch[text_field], indices):
            if not isinstance(text, str):
                raise DataError(f"row {i}: field {text_field!r} is {type(text).__name__}, not a string")
        texts = [t for t in batch[text_field] if t.strip()]  # blank documents are dropped
        ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return {"input_ids": [x if x and x[-1] == eos else x + [eos] for x in ids]}

    return tokenize


@dataclass
class TokenizedDocs:
    """Every document's tokens (EOS included) in one flat array, document ``i`` at
    ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray  # (total,) uint16 or uint32
    offsets: np.ndarray  # (n_docs + 1,) int64

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _cache_key(cfg: DataConfig, fmt: str, source: str, tokenizer) -> str:
    settings = {"version": CACHE_VERSION, "format": fmt, "text_field": cfg.text_field,
                "sample_by": cfg.sample_by, "source": source, "tokenizer": _tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _token_dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def tokenize_documents(cfg: DataConfig, tokenizer, ds) -> TokenizedDocs:
    """Tokenize every document of the ``datasets.Dataset`` ``ds`` with a batched ``map``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ds = ds.map(_tokenize_fn(tokenizer, cfg.text_field), batched=True, batch_size=TOKENIZE_BATCH,
                with_indices=True, remove_columns=ds.column_names,
                num_proc=cfg.num_proc if cfg.num_proc > 1 else None, desc="tokenizing")
    column = ds.data.column("input_ids")
    if len(column) == 0:
        raise DataError(f"path={cfg.path!r}: holds no non-empty documents")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pa.chunked_array([chunk.flatten() for chunk in column.chunks])
    tokens = values.to_numpy().astype(_token_dtype(tokenizer))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedDocs(tokens, offsets)


def load_or_tokenize(cfg: DataConfig, tokenizer) -> tuple[TokenizedDocs, bool, Path | None]:
    """Tokenized documents of ``cfg``, from ``cfg.cache_dir`` when an entry with the same
    file contents, tokenizer and read settings is there. Returns (docs, from_cache, entry)."""
    read = dict(text_field=cfg.text_field, sample_by=cfg.sample_by, streaming=False)
    if cfg.format == "hub":
        fmt, files = "hub", []
        hub_cache = str(Path(cfg.cache_dir) / "hub") if cfg.cache_dir else None  # the download, kept
        hub_ds = open_dataset(fmt, files, **read, cache_dir=hub_cache, hub=(cfg.path, cfg.hub_config, cfg.hub_split))
        source = f"{cfg.path}|{cfg.hub_config}|{cfg.hub_split}|{hub_ds._fingerprint}"

        def open_source(tmp):
            return hub_ds
    else:
        fmt, files = resolve_files(cfg.path, cfg.format)
        # Contents, not paths or mtimes: a fresh clone of the same corpus reuses the cache.
        source = _hash_files(files)

        def open_source(tmp):
            # datasets' own arrow files go in a temporary folder and leave with it.
            return open_dataset(fmt, files, **read, cache_dir=tmp)

    if cfg.cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return tokenize_documents(cfg, tokenizer, open_source(tmp)), False, None
    entry = Path(cfg.cache_dir) / _cache_key(cfg, fmt, source, tokenizer)
    if (entry / "meta.json").is_file():
        tokens = np.load(entry / "tokens.npy", mmap_mode="r")
        return TokenizedDocs(tokens, np.load(entry / "offsets.npy")), True, entry
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cfg.cache_dir))
    work.chmod(0o755)
    try:
        docs = tokenize_documents(cfg, tokenizer, open_source(str(work / "hf")))
        shutil.rmtree(work / "hf", ignore_errors=True)
        np.save(work / "tokens.npy", docs.tokens)
        np.save(work / "offsets.npy", docs.offsets)
        meta = {"version": CACHE_VERSION, "path": cfg.path, "files": [str(f) for f in files],
                "tokenizer": cfg.tokenizer, "n_docs": docs.n_docs, "n_tokens": int(docs.offsets[-1])}
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            work.rename(entry)  # complete entries only; a concurrent writer may have won
        except OSError:
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return docs, False, entry


@dataclass
class PackedSplit:
    """Blocks of one split: ``blocks[i]`` is a row of token ids, ``starts[i, j]`` is True
    where a document begins at column ``j``; SFT splits also carry the targets."""

    blocks: np.ndarray  # (n_blocks, seq_len) uint16/uint32
    starts: np.ndarray  # (n_blocks, seq_len) bool
    n_docs: int
    n_tokens: int  # tokens of the split's documents, the dropped tail included
    labels: np.ndarray | None = None  # (n_blocks, seq_len) int32, -100 where there is no loss

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
        return (f"data {self.config.path}: {self.train.n_docs} train docs, {self.train.n_tokens:,} tokens -> "
                f"{len(self.train)} blocks of {self.seq_len}; {held}; {cache}")


def prepare_data(cfg: DataConfig, tokenizer, seq_len: int):
    """Tokenize (or load from cache), split and pack ``cfg``'s corpus into ``seq_len`` blocks.

    Returns ``PackedData``, or ``StreamingData`` when ``cfg.streaming``. Raises ``DataError``
    for bad files, bad settings, or a training split shorter than one block."""
    _check(seq_len >= 2, "seq_len", seq_len, "must be >= 2")
    if cfg.kind == "sft":
        from flashlm.sft import prepare_sft_data

        return prepare_sft_data(cfg, tokenizer, seq_len)
    if cfg.streaming:
        return StreamingData(cfg, tokenizer, seq_len)
    docs, from_cache, entry = load_or_tokenize(cfg, tokenizer)
    train_order, eval_idx = split_documents(docs.n_docs, cfg)
    train = pack(docs, train_order, seq_len)
    if len(train) == 0:
        raise DataError(f"path={cfg.path!r}: the training split holds {train.n_tokens} tokens, "
                        f"less than one block of seq_len={seq_len}")
    evals = pack(docs, eval_idx, seq_len) if len(eval_idx) else None
    return PackedData(cfg, seq_len, tokenizer.eos_token_id, train, evals, from_cache, entry)


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


def _rows(split: PackedSplit, rows) -> dict[str, Any]:
    return make_batch(split.blocks[rows], split.starts[rows], None if split.labels is None else split.labels[rows])


def _check_rank(batch_size, rank, world_size):
    _check(batch_size >= 1, "batch_size", batch_size, "must be >= 1")
    _check(world_size >= 1, "world_size", world_size, "must be >= 1")
    _check(0 <= rank < world_size, "rank", rank, f"must be in [0, world_size={world_size})")


class TrainLoader:
    """Infinite training batches over a ``PackedSplit``: epoch ``e`` visits the blocks in the
    order ``permutation(seed, e)``, rank ``r`` of ``w`` taking positions ``r, r + w, ...``;
    every rank gets the same number of batches and the tail of an epoch is dropped."""

    def __init__(self, split: PackedSplit, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        _check_rank(batch_size, rank, world_size)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(split) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"the training split packs into {len(split)} blocks, fewer than "
                            f"batch_size * world_size = {batch_size * world_size}: add data or shrink the batch")
        self.epoch, self.batch = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, 1, self.epoch]).permutation(len(self.split))
            mine = perm[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]
            self._order_epoch, self._order = self.epoch, mine
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self._epoch_order()[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        self.batch += 1
        return _rows(self.split, rows)

    def state_dict(self) -> dict[str, int]:
        """The data position after the batches returned so far, and what it depends on."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "n_blocks": len(self.split)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        _check_same(state, self.state_dict(), ("seed", "batch_size", "world_size", "n_blocks"))
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


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
        cfg, tokenize = self.config, _tokenize_fn(self.tokenizer, self.config.text_field)
        skip = 0 if stop is not None else (cfg.eval_docs or 0)
        dtype = _token_dtype(self.tokenizer)
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
        buffer, tokens, starts = [], np.zeros(0, _token_dtype(self.data.tokenizer)), np.zeros(0, bool)
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
