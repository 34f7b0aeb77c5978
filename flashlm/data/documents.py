"""Tokenized documents: a corpus tokenized once with a batched ``datasets.map`` and cached.

Tokenized documents are stored under ``cache_dir`` in an entry keyed on the data files'
contents (or a hub dataset's fingerprint), the tokenizer and the read settings; the split and
packing are redone from it in milliseconds, so ``seq_len``, ``seed`` and the eval settings do
not key it. An entry is written into a temporary folder and renamed when complete. Under
Accelerate, call ``prepare_data`` inside ``accelerator.main_process_first()`` so that one
process tokenizes and the others read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashlm.data.sources import DataError, local_rows, open_dataset, resolve_files
from flashlm.data.tokenizer import TOKENIZE_BATCH, token_dtype, tokenize_fn, tokenizer_fingerprint
from flashlm.recipe import DataConfig

CACHE_VERSION = 1


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
                "sample_by": cfg.sample_by, "source": source, "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def tokenize_documents(cfg: DataConfig, tokenizer, ds) -> TokenizedDocs:
    """Tokenize every document of the ``datasets.Dataset`` ``ds`` with a batched ``map``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ds = ds.map(tokenize_fn(tokenizer, cfg.text_field), batched=True, batch_size=TOKENIZE_BATCH,
                with_indices=True, remove_columns=ds.column_names,
                num_proc=cfg.num_proc if cfg.num_proc > 1 else None, desc="tokenizing")
    column = ds.data.column("input_ids")
    if len(column) == 0:
        raise DataError(f"path={cfg.path!r}: holds no non-empty documents")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pa.chunked_array([chunk.flatten() for chunk in column.chunks])
    tokens = values.to_numpy().astype(token_dtype(tokenizer))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedDocs(tokens, offsets)


def tokenize_local(cfg: DataConfig, tokenizer, fmt: str, files: list[Path]) -> TokenizedDocs:
    """``tokenize_documents`` for local text or jsonl files on a machine without ``datasets``:
    the same tokens, ``TOKENIZE_BATCH`` documents a tokenizer call."""
    tokenize, dtype = tokenize_fn(tokenizer, cfg.text_field), token_dtype(tokenizer)
    texts = (row[cfg.text_field] for row in local_rows(fmt, files, cfg.text_field, cfg.sample_by))
    docs = []
    while batch := list(itertools.islice(texts, TOKENIZE_BATCH)):
        ids = tokenize({cfg.text_field: batch}, range(len(docs), len(docs) + len(batch)))["input_ids"]
        docs += [np.asarray(x, dtype) for x in ids]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return TokenizedDocs(np.concatenate(docs), offsets)


def load_or_tokenize(cfg: DataConfig, tokenizer) -> tuple[TokenizedDocs, bool, Path | None]:
    """Tokenized documents of ``cfg``, from ``cfg.cache_dir`` when an entry with the same
    file contents, tokenizer and read settings is there. Returns (docs, from_cache, entry)."""
    read = dict(text_field=cfg.text_field, sample_by=cfg.sample_by, streaming=False)
    if cfg.format == "hub":
        fmt, files = "hub", []
        hub_cache = str(Path(cfg.cache_dir) / "hub") if cfg.cache_dir else None  # the download, kept
        hub_ds = open_dataset(fmt, files, **read, cache_dir=hub_cache, hub=(cfg.path, cfg.hub_config, cfg.hub_split))
        source = f"{cfg.path}|{cfg.hub_config}|{cfg.hub_split}|{hub_ds._fingerprint}"

        def tokenize(tmp):
            return tokenize_documents(cfg, tokenizer, hub_ds)
    else:
        fmt, files = resolve_files(cfg.path, cfg.format)
        # Contents, not paths or mtimes: a fresh clone of the same corpus reuses the cache.
        source = _hash_files(files)

        def tokenize(tmp):
            if fmt in ("text", "jsonl") and importlib.util.find_spec("datasets") is None:
                return tokenize_local(cfg, tokenizer, fmt, files)
            # datasets' own arrow files go in a temporary folder and leave with it.
            return tokenize_documents(cfg, tokenizer, open_dataset(fmt, files, **read, cache_dir=tmp))

    if cfg.cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return tokenize(tmp), False, None
    entry = Path(cfg.cache_dir) / _cache_key(cfg, fmt, source, tokenizer)
    if (entry / "meta.json").is_file():
        tokens = np.load(entry / "tokens.npy", mmap_mode="r")
        return TokenizedDocs(tokens, np.load(entry / "offsets.npy")), True, entry
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cfg.cache_dir))
    work.chmod(0o755)
    try:
        docs = tokenize(str(work / "hf"))
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
