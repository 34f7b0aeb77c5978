"""Supervised fine-tuning (SFT) data: instruction examples rendered, tokenized, masked and packed,
and the exact-match evaluation of a fine-tuned model.

A recipe selects it with ``data.kind: sft`` (``flashlm.data.prepare_data`` hands the data over
here); the training loop then gets batches with ``labels`` and trains on them unchanged::

    data:     {kind: sft, path: data/sft/train.jsonl, tokenizer: runs/debug_cpu/hf, eval_docs: 64,
               truncation: false}
    training: {document_mask: true, seq_len: 256, ...}

Each line of the jsonl files is one example, in one of two forms:

- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``
  (roles ``system``, ``user``, ``assistant``): rendered with the tokenizer's chat template, or
  ``data.chat_template``, or ``DEFAULT_CHAT_TEMPLATE`` when the tokenizer has none. The template
  used is stored on the tokenizer, so the exported model carries it.
- ``{"prompt": "...", "response": "..."}``: the prompt's tokens, the response's tokens and EOS.

Other keys on a line are ignored. The loss covers the assistant turns (the response and its
EOS) only: every other token has the label -100. Text that flashlm assembles itself (the
default template, a prompt) gets the tokenizer's own special tokens, as pretraining documents
do (none for the bundled tokenizer, BOS for Llama's); a tokenizer's own chat template brings
its special tokens itself.

Packing: examples are placed whole, in a seeded order, into rows of ``seq_len`` tokens; a row
is closed when the next example does not fit and its tail is padding (a segment of its own with
no loss). Each example is a document of the batch's ``cu_seqlens``, so with document masking
(required: ``training.document_mask: true``) an example never attends to another. An example
longer than ``seq_len`` is an error, or with ``data.truncation: true`` is cut to ``seq_len``
tokens and counted; one left with no response token is dropped and counted. ``eval_docs`` /
``eval_fraction`` hold out examples (seeded) for the training loop's evaluation loss.

Errors (``DataError``) name the file and line: a line that is not JSON or not an object, one
with neither ``messages`` nor ``prompt``/``response``, a message with an unknown role or
non-string content, a conversation without an assistant turn, an over-long example.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashlm.data.sources import DataError, resolve_files
from flashlm.model.loss import IGNORE_INDEX
from flashlm.recipe import DataConfig

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# Used when neither the tokenizer nor the recipe has a template. Plain-text role headers (no new
# vocabulary), a newline after each header so the response starts on a token boundary, and the
# EOS token ending every assistant turn so the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif -%}"
)


@dataclass
class Example:
    """One tokenized example: ``labels`` is ``input_ids`` with -100 where there is no loss."""

    input_ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64
    where: str  # "file:line"


def read_records(files) -> list[tuple[dict[str, Any], str]]:
    """Every non-blank line of the jsonl ``files`` as (validated record, "file:line")."""
    records = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                check_record(record, where)
                records.append((record, where))
    return records


def check_record(record: Any, where: str) -> None:
    """Raise ``DataError`` (naming ``where``) unless ``record`` is a usable example."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has_chat, has_pair = "messages" in record, "prompt" in record or "response" in record
    if has_chat == has_pair:
        found = f"found keys {sorted(record)}" if not has_chat else "found both"
        raise DataError(f"{where}: an example has either a 'messages' list or 'prompt' and 'response' strings; {found}")
    if has_pair:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string, got {record.get(key)!r}")
        return
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has the unknown role {message['role']!r}; "
                            f"the roles are {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i} has content of type {type(message['content']).__name__}, "
                            "not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn")


def use_chat_template(tokenizer, template: str | None = None) -> bool:
    """Give ``tokenizer`` the chat template SFT renders with: ``template`` if set, else its own,
    else ``DEFAULT_CHAT_TEMPLATE``. Returns True when that is flashlm's default (whose text gets
    the tokenizer's own special tokens, see the module docstring)."""
    if template is not None:
        tokenizer.chat_template = template
    elif tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _without_trailing_eos(ids, tokenizer):
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids


def tokenize_record(record: dict[str, Any], where: str, tokenizer, default_template: bool) -> Example:
    """Token ids and labels of a validated record (the tokenizer's chat template already set)."""
    if "messages" not in record:
        prompt = _without_trailing_eos(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"], tokenizer)
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = np.array(prompt + response, dtype=np.int64)
        labels = ids.copy()
        labels[:len(prompt)] = IGNORE_INDEX
        return Example(ids, labels, where)
    messages = record["messages"]
    text = _render(tokenizer, messages)
    # Each assistant turn is the text that rendering it adds after the generation prompt.
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn (the text "
                            f"up to assistant message {i} is not a prefix of the whole), so flashlm cannot find "
                            "the assistant's tokens; set data.chat_template to a template that does")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=default_template, return_offsets_mapping=True)
    ids = np.array(encoded["input_ids"], dtype=np.int64)
    starts = np.array([start if end > start else -1 for start, end in encoded["offset_mapping"]])
    in_response = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        in_response |= (starts >= lo) & (starts < hi)
    labels = np.where(in_response, ids, IGNORE_INDEX)
    if not in_response.any():
        raise DataError(f"{where}: the assistant messages render to no tokens")
    return Example(ids, labels, where)


def prompt_ids(record: dict[str, Any], tokenizer, default_template: bool) -> list[int]:
    """The tokens a model is given to answer ``record``: everything before its last assistant
    message, with the generation prompt (or the prompt of a prompt/response pair)."""
    if "messages" not in record:
        return _without_trailing_eos(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"], tokenizer)
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = _render(tokenizer, messages[:last], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=default_template)["input_ids"]


def reference_answer(record: dict[str, Any]) -> str:
    """The expected answer: the response, or the content of the last assistant message."""
    if "messages" not in record:
        return record["response"]
    return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]


def fit_to_context(examples: list[Example], seq_len: int, truncation: bool) -> tuple[list[Example], int, int]:
    """(examples that fit in ``seq_len``, how many were truncated, how many of those were dropped
    for having no response token left). Without ``truncation`` an over-long example is an error."""
    kept, truncated, dropped = [], 0, 0
    for ex in examples:
        if len(ex.input_ids) > seq_len:
            if not truncation:
                raise DataError(f"{ex.where}: the example is {len(ex.input_ids)} tokens long, more than the "
                                f"context training.seq_len={seq_len}; raise seq_len, shorten the example, or set "
                                "data.truncation: true to cut such examples (they are counted)")
            truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len], ex.where)
            if (ex.labels == IGNORE_INDEX).all():
                dropped += 1
                continue
        kept.append(ex)
    return kept, truncated, dropped


def load_examples(cfg: DataConfig, tokenizer) -> tuple[list[tuple[dict, str]], bool]:
    """The validated records of ``cfg.path`` and whether the default chat template is in use."""
    _, files = resolve_files(cfg.path, "jsonl")
    default_template = use_chat_template(tokenizer, cfg.chat_template)
    return read_records(files), default_template
