"""Tokenizers: loading one, checking it fits the model, and the tokenization every producer shares.

A document is tokenized with the tokenizer's own special tokens (none for the bundled tokenizer,
BOS for Llama's) and always ends in one EOS token, which belongs to the document it ends.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from flashlm.data.sources import DataError

TOKENIZE_BATCH = 1000  # documents per tokenizer call


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


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, merges and EOS id: what a token cache is keyed on."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()


def token_dtype(tokenizer):
    """The smallest unsigned numpy dtype that holds every token id."""
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def tokenize_fn(tokenizer, text_field):
    """A batched ``datasets.map`` function: ``{text_field: [str]}`` -> ``{"input_ids": [[int]]}``,
    blank documents dropped, each document ending in EOS."""
    eos = tokenizer.eos_token_id

    def tokenize(batch, indices):
        for text, i in zip(batch[text_field], indices):
            if not isinstance(text, str):
                raise DataError(f"row {i}: field {text_field!r} is {type(text).__name__}, not a string")
        texts = [t for t in batch[text_field] if t.strip()]  # blank documents are dropped
        ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return {"input_ids": [x if x and x[-1] == eos else x + [eos] for x in ids]}

    return tokenize
