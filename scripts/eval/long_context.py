"""Long-context evaluation on held-out documents: loss by position, passkey retrieval over a grid
of lengths and depths, and multi-key retrieval, for a model and, optionally, the model it
started from (``--before``), on the same prompts, so that what a training stage gained shows.

**Loss by position.** Windows of ``--seq-len`` tokens, each inside one held-out document (round
robin over the documents long enough; the documents concatenated only when none is), and each
token's next-token loss averaged into position buckets ``[0, F), [F, 2F), [2F, 4F), ..., [L/2, L)``
(``F = --first-bucket``). A model that uses its context has lower loss late in the window; one
that breaks past its trained length has higher.

**Passkey** (``--lengths`` x ``--depths`` x ``--trials``). A five-digit key hidden at a depth
(0 = start, 1 = end) of a haystack of held-out text, and a question whose answer is the key::

    <intro> <text> The pass key is 12345. Remember it: 12345. <text> What is the pass key? The pass key is 12345

**Multi-key** (RULER's multi-key needle, ``--multikey-keys`` needles, ``--multikey-trials``
per length). Several named numbers are hidden at random depths; the question asks for one of
them, whose needle sits at depths spread evenly over the trials::

    <intro> <text> The number stored under cobalt is 804113. <text> The number stored under
    falcon is 271906. <text> ... Which number is stored under falcon? It is 271906

**Code facts** (``in_format``; ``--multikey-keys`` facts and ``--multikey-trials`` trials per
length, as multi-key). The format of ``data.retrieval_kind: facts`` (``flashlm.data.retrieval``)
planted in held-out text: facts such as ``_fact_q7k2x = "3fa90c"`` at random depths and, at the
end, one of those lines begun again. For a model trained on that mix it is a diagnostic, not a
held-out task: when passkey fails, it tells a model that never learned to retrieve from one
that learned it in its training format only. For a model trained with another kind (the ladder
plants ``random_spans``) it is one more retrieval in a format training never saw::

    <text> _fact_q7k2x = "3fa90c" <text> _fact_m0c4e = "b3f0a1" <text> _fact_q7k2x = "3fa90c"

**Copy** (``--copy-trials`` per length and depth, 0 = off). The ladder's training task,
``random_spans`` (``flashlm.data.retrieval``), in held-out text: at a depth, the text's own
tokens (a cue, the shortest run of 4-16 tokens there that occurs nowhere else before the copy)
followed by ``COPY_TOKENS`` random tokens; at the end the cue again, and the answer is the random
tokens. In distribution for a model trained on that mix, so next to passkey it tells a model
that cannot copy from that far from one whose copying does not carry over to the passkey's
English prompt::

    <text> def load(self, path): 2817 77 3904 ... <text> def load(self, path): -> 2817 77 3904 ...

Every prompt is exactly the length of its cell. A trial is correct when the argmax at every
answer position is the answer token: what greedy decoding would produce, without the decoding
loop. Keys, values, names and haystack offsets come from a generator seeded by (``--seed``,
task, length, depth, trial), so the ``--before`` model reads the very same prompts. Haystacks
are held-out text without its end-of-document tokens, taken from one document when one is long
enough. Nothing of the passkey and multi-key formats is in flashlm's training data: the ladder
trains on source code only, and the evaluation's documents are packages the training never saw.

Held-out documents: ``--data`` (jsonl with a "text" field, or text files, tokenized as training
tokenizes them, through the token cache), or by default the documents the run held out (its
recipe's eval split).

    PYTHONPATH=. python3 scripts/eval/long_context.py --model runs/longctx/8k --before runs/longctx/4k \\
        --seq-len 8192 --lengths 4096 8192 --before-lengths 8192 --data .cache/code_corpus/eval.jsonl

Writes ``--out`` (default ``<model>/long_context.json``, with the provenance block of
``scripts/provenance.py``) and a Markdown summary beside it; ``--plots`` adds the needle heat
map and the loss-by-position curves as PNGs (needs matplotlib). Finished cells are kept in
``<out>.partial.json``: with ``--time-limit`` the evaluation stops before a batch it has no time
for, and running it again continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import environment  # noqa: E402

PASSKEY = {
    "intro": ("Somewhere in the long text below there is a pass key. Find it and keep it in mind; "
              "you will be asked for it.\n\n"),
    "needle": "\n\nThe pass key is {value}. Remember it: {value}.\n\n",
    "question": "\n\nWhat is the pass key? The pass key is",
    "answer": " {value}",
}
MULTIKEY = {
    "intro": ("Several numbers are stored under names in the long text below. Remember each one; "
              "you will be asked for one of them.\n\n"),
    "needle": "\n\nThe number stored under {name} is {value}.\n\n",
    "question": "\n\nWhich number is stored under {name}? It is",
    "answer": " {value}",
}
NAMES = ("amber", "birch", "cobalt", "dune", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lagoon", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
         "umber", "velvet", "willow", "yarrow", "zephyr", "acorn", "basalt", "cedar", "delta", "fjord")


COPY_TOKENS = 8  # the copy task's answer: random tokens after the cue
COPY_CUE_TOKENS = (4, 16)  # the copy task's cue length: the shortest unique run in this range


class TimeLimit(Exception):
    """Raised before a batch that would end past the deadline; finished cells are kept."""


def load_model(path, device, mlp_chunk_size):
    """A flashlm run directory or checkpoint, or a Hugging Face directory, ready for inference."""
    from flashlm.training.checkpoint import load_model as load

    try:
        model = load(path, attn_backend="auto", gradient_checkpointing=False, checkpoint_dtype=None,
                     checkpoint_offload=False, checkpoint_keep_attention=False, mlp_chunk_size=mlp_chunk_size,
                     loss_chunk_size=4096, loss_impl="chunked")
    except FileNotFoundError as e:
        raise SystemExit(f"model {path}: {e}") from None
    return model.to(device).eval()


def model_identity(path) -> str:
    """What a model path names (a run's newest checkpoint): part of the key of its cached cells."""
    from flashlm.training.checkpoint import TRAINER_STATE, CheckpointManager

    path = Path(path)
    complete = [] if (path / TRAINER_STATE).is_file() else CheckpointManager(path / "checkpoints", 1).complete()
    return str((complete[-1][1] if complete else path).resolve())


def run_recipe(path):
    """The resolved recipe of a run directory or checkpoint, or None for other models."""
    from flashlm.recipe import recipe_from_dict
    from flashlm.training.checkpoint import is_checkpoint, read_recipe, resolve_checkpoint

    if not is_checkpoint(path):
        return None
    return recipe_from_dict(read_recipe(resolve_checkpoint(path)))


def held_out_documents(args, tokenizer_path, tokenizer, recipe) -> list[torch.Tensor]:
    """The held-out documents, each an int64 token tensor ending in EOS, in corpus order."""
    from flashlm.data import DataConfig, DataError
    from flashlm.data.documents import load_or_tokenize
    from flashlm.data.packing import split_documents

    if args.data is not None:
        cfg = DataConfig(path=args.data, tokenizer=str(tokenizer_path), cache_dir=args.cache_dir)
        indices = None
    elif recipe is None:
        raise SystemExit("--data is required for a model that is not a flashlm run (no recipe to find "
                         "its held-out documents)")
    else:
        cfg = recipe.data
    try:
        docs, _, _ = load_or_tokenize(cfg, tokenizer)
    except DataError as e:
        raise SystemExit(f"--data: {e}") from None
    if args.data is None:
        _, indices = split_documents(docs.n_docs, cfg)
        if len(indices) == 0:
            raise SystemExit("the run holds out no documents (data.eval_fraction and data.eval_docs are 0); "
                             "pass --data")
    indices = range(docs.n_docs) if indices is None else indices
    return [torch.from_numpy(np.asarray(docs.tokens[docs.offsets[i]:docs.offsets[i + 1]]).astype(np.int64))
            for i in indices]


class FinalHidden:
    """Captures the model's final normalized hidden states (a forward hook on ``model.norm``)
    so that logits are computed only where they are needed."""

    def __init__(self, model):
        self.value = None
        self._handle = model.norm.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.value = output

    def close(self):
        self._handle.remove()


class Runner:
    """One model on one device: forward passes that return final hidden states, and the clock
    that stops a batch that would end past the deadline."""

    def __init__(self, model, device, autocast, deadline):
        self.model, self.device, self.autocast, self.deadline = model, device, autocast, deadline
        self.capture = FinalHidden(model)
        self.seconds_per_row = {}  # seq_len -> seconds one row took last time

    def hidden(self, ids):
        """(B, S, hidden) final hidden states of (B, S) ids; the chunked loss path keeps the full
        logits from ever existing."""
        seq_len = ids.shape[1]
        if self.deadline is not None:
            needed = self.seconds_per_row.get(seq_len, 0.0) * ids.shape[0]
            if time.monotonic() + needed > self.deadline:
                raise TimeLimit(f"no time left for {ids.shape[0]} x {seq_len} tokens")
        start = time.monotonic()
        ids = ids.to(self.device)
        with torch.no_grad(), self.autocast:
            self.model(ids, labels=ids)
        value = self.capture.value
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds_per_row[seq_len] = (time.monotonic() - start) / ids.shape[0]
        return value

    def predictions(self, hidden, positions):
        """Argmax token ids (len(positions),) at the given positions of hidden (S, hidden)."""
        weight = self.model.lm_head.weight
        return (hidden[positions].to(weight.dtype) @ weight.T).argmax(-1).tolist()

    def token_losses(self, hidden, targets, chunk=4096):
        """Next-token losses (S - 1,) fp32 from hidden (S, hidden), ``chunk`` rows of logits at a time."""
        weight = self.model.lm_head.weight
        out = []
        for start in range(0, len(targets), chunk):
            logits = (hidden[start:start + chunk].to(weight.dtype) @ weight.T).float()
            out.append(torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="none"))
        return torch.cat(out)

    def close(self):
        self.capture.close()


def bucket_edges(seq_len, first_bucket):
    """Bucket boundaries by position: [0, F, 2F, 4F, ..., L] (doubling; the last bucket ends at L)."""
    edges, edge = [0], first_bucket
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


def loss_windows(docs, seq_len, count):
    """(windows, within_document): up to ``count`` windows of ``seq_len`` tokens, the k-th window of
    every document long enough before any (k+1)-th; the documents concatenated when none is."""
    long_docs = [d for d in docs if len(d) >= seq_len]
    if not long_docs:
        stream = torch.cat(docs)
        n = min(count, len(stream) // seq_len)
        if n == 0:
            raise SystemExit(f"the held-out documents hold {len(stream)} tokens, fewer than one window of "
                             f"{seq_len}; pass --data with longer documents")
        return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)], False
    windows, k = [], 0
    while len(windows) < count:
        fresh = [d[k * seq_len:(k + 1) * seq_len] for d in long_docs if (k + 1) * seq_len <= len(d)]
        if not fresh:
            break
        windows += fresh[:count - len(windows)]
        k += 1
    return windows, True


def loss_by_position(runner, docs, args):
    seq_len = args.seq_len
    windows, within = loss_windows(docs, seq_len, args.windows)
    edges = bucket_edges(seq_len, args.first_bucket)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
    for ids in windows:
        hidden = runner.hidden(ids[None])[0, :-1]
        losses = runner.token_losses(hidden, ids[1:].to(hidden.device)).double().cpu()
        for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
            part = losses[lo:min(hi, seq_len - 1)]
            sums[b] += part.sum()
            counts[b] += len(part)
    buckets = [{"start": lo, "end": hi, "tokens": int(counts[b]), "loss": (sums[b] / counts[b]).item()}
               for b, (lo, hi) in enumerate(zip(edges, edges[1:])) if counts[b]]
    return {"seq_len": seq_len, "windows": len(windows), "within_document": within, "tokens": int(counts.sum()),
            "loss": (sums.sum() / counts.sum()).item(), "buckets": buckets}


class Haystack:
    """Filler for retrieval prompts: held-out tokens without end-of-document tokens, from one
    document when one is long enough, else from the documents joined end to end."""

    def __init__(self, docs, eos_token_id):
        self.docs = [d[:-1] if len(d) and d[-1] == eos_token_id else d for d in docs]
        self.stream = torch.cat(self.docs)

    def take(self, rng, n):
        long_docs = [d for d in self.docs if len(d) >= n]
        if long_docs:
            doc = long_docs[rng.randrange(len(long_docs))]
            start = rng.randrange(len(doc) - n + 1)
            return doc[start:start + n]
        stream = self.stream.repeat(math.ceil(2 * n / len(self.stream))) if len(self.stream) < n else self.stream
        start = rng.randrange(len(stream) - n + 1)
        return stream[start:start + n]


def retrieval_prompt(tokenizer, filler, seq_len, fmt, needles, query):
    """(ids (seq_len,), answer start, answer ids): ``fmt``'s intro, the filler with each needle
    (a dict of format fields, and its depth in 0..1) placed at its depth, then the question and
    answer for the fields ``query``. ``filler(n)`` returns n filler tokens."""
    def encode(text, first=False):
        # The prompt opens like a training document: with the tokenizer's own special tokens.
        return tokenizer(text, add_special_tokens=first)["input_ids"]

    intro, question = encode(fmt["intro"], first=True), encode(fmt["question"].format(**query))
    answer = encode(fmt["answer"].format(**query))
    placed = [(encode(fmt["needle"].format(**fields)), depth) for fields, depth in needles]
    filler_len = seq_len - len(intro) - sum(len(n) for n, _ in placed) - len(question) - len(answer)
    if filler_len < 1:
        raise SystemExit(f"a prompt of {seq_len} tokens is too short for {len(needles)} needle(s)")
    text = filler(filler_len).tolist()
    ids, previous = list(intro), 0
    for needle, depth in sorted(placed, key=lambda p: p[1]):
        at = round(depth * filler_len)
        ids += text[previous:at] + needle
        previous = at
    ids += text[previous:] + question + answer
    return torch.tensor(ids, dtype=torch.int64), len(ids) - len(answer), answer


def passkey_prompt(tokenizer, haystack, rng, seq_len, depth):
    value = rng.randint(10000, 99999)
    return retrieval_prompt(tokenizer, lambda n: haystack.take(rng, n), seq_len, PASSKEY,
                            [({"value": value}, depth)], {"value": value})


def multikey_prompt(tokenizer, haystack, rng, seq_len, depth, keys):
    names = rng.sample(NAMES, keys)
    values = [rng.randint(100000, 999999) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]  # the first name is the one asked for
    needles = [({"name": n, "value": v}, d) for n, v, d in zip(names, values, depths)]
    return retrieval_prompt(tokenizer, lambda n: haystack.take(rng, n), seq_len, MULTIKEY, needles,
                            {"name": names[0], "value": values[0]})


def in_format_prompt(tokenizer, haystack, rng, seq_len, depth, keys):
    """The training mix's retrieval (`flashlm.data.retrieval`) in held-out text: ``keys`` facts,
    the one asked for at ``depth``, the question begun at the end."""
    from flashlm.data.retrieval import ANSWER, FACT, QUESTION, fact_fields

    names, values = fact_fields(np.random.default_rng(rng.getrandbits(64)), keys)
    depths = [depth] + [rng.random() for _ in names[1:]]
    needles = [({"name": n, "value": v}, d) for n, v, d in zip(names, values, depths)]
    fmt = {"intro": "", "needle": FACT, "question": QUESTION, "answer": ANSWER}
    return retrieval_prompt(tokenizer, lambda n: haystack.take(rng, n), seq_len, fmt, needles,
                            {"name": names[0], "value": values[0]})


def copy_prompt(tokenizer, haystack, rng, seq_len, depth, pool):
    """(ids, answer start, answer): filler with, at ``depth``, a cue of its own tokens followed by
    ``COPY_TOKENS`` tokens drawn from ``pool``; at the end the cue again, then those tokens."""
    from flashlm.data.retrieval import unique_cue_length

    head = tokenizer("", add_special_tokens=True)["input_ids"]  # the tokenizer's own start, as a document's
    longest = COPY_CUE_TOKENS[1]
    room = seq_len - len(head) - 2 * COPY_TOKENS  # the filler, the source's cue and the copy's
    if room < 3 * longest:
        raise SystemExit(f"a prompt of {seq_len} tokens is too short for the copy task")
    answer = [int(pool[rng.randrange(len(pool))]) for _ in range(COPY_TOKENS)]
    text = haystack.take(rng, room).tolist()
    at = round(depth * (room - 2 * longest))
    # Unique in the text before the copy: the prompt keeps text[:room - cue], within the text searched.
    cue = unique_cue_length(np.asarray(text), 0, at, room - COPY_CUE_TOKENS[0], *COPY_CUE_TOKENS)
    ids = head + text[:at + cue] + answer + text[at + cue:room - cue] + text[at:at + cue] + answer
    return torch.tensor(ids, dtype=torch.int64), len(ids) - COPY_TOKENS, answer


def score(runner, prompts, batch_tokens):
    """(correct, answer tokens right) over ``prompts`` (ids, answer start, answer), batched to
    about ``batch_tokens`` tokens a forward pass."""
    correct = right = 0
    rows = max(1, batch_tokens // len(prompts[0][0]))
    for i in range(0, len(prompts), rows):
        batch = prompts[i:i + rows]
        hidden = runner.hidden(torch.stack([ids for ids, _, _ in batch]))
        for h, (_, start, answer) in zip(hidden, batch):
            # The token at position p predicts p + 1: the answer is predicted from start - 1 on.
            predicted = runner.predictions(h, torch.arange(start - 1, start - 1 + len(answer), device=h.device))
            hits = sum(p == a for p, a in zip(predicted, answer))
            correct += hits == len(answer)
            right += hits / len(answer)
    return correct, right


def depths(n):
    return [i / (n - 1) for i in range(n)] if n > 1 else [0.5]


class Cells:
    """Finished cells of an evaluation, saved after each one in ``path`` under a key of the models
    and settings, so a stopped evaluation continues where it stopped."""

    def __init__(self, path, key):
        self.path, self.key = path, key
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.cells = saved.get("cells", {}) if saved.get("key") == key else {}

    def get(self, name, compute):
        if name not in self.cells:
            self.cells[name] = compute()
            self.path.write_text(json.dumps({"key": self.key, "cells": self.cells}))
        return self.cells[name]


def depth_grid(role, task, runner, lengths, cells, args, trials, make):
    """Accuracy by length and depth (``--depths``) of ``trials`` prompts a cell, each from
    ``make(rng, length, depth)`` with a generator seeded by task, length, depth and trial."""
    grid, tokens = {}, {}
    for length in lengths:
        grid[str(length)], tokens[str(length)] = [], []
        for d, depth in enumerate(depths(args.depths)):
            def cell(length=length, d=d, depth=depth):
                prompts = [make(random.Random(f"{args.seed}/{task}/{length}/{d}/{t}"), length, depth)
                           for t in range(trials)]
                correct, right = score(runner, prompts, args.batch_tokens)
                return {"correct": correct, "answer_tokens": right, "trials": trials}
            result = cells.get(f"{role}/{task}/{length}/{d}", cell)
            grid[str(length)].append(result["correct"] / result["trials"])
            tokens[str(length)].append(result["answer_tokens"] / result["trials"])
    return {"lengths": lengths, "depths": depths(args.depths), "trials": trials, "accuracy": grid,
            "answer_token_accuracy": tokens, "by_length": {k: sum(v) / len(v) for k, v in grid.items()}}


def evaluate(role, runner, tokenizer, docs, haystack, lengths, cells, args):
    """Loss by position at ``--seq-len`` and the retrieval grids at ``lengths`` for one model."""
    from flashlm.data.retrieval import random_token_pool

    report = {"loss_by_position": cells.get(f"{role}/loss", lambda: loss_by_position(runner, docs, args))}
    report["passkey"] = depth_grid(role, "passkey", runner, lengths, cells, args, args.trials,
                                   lambda rng, length, depth: passkey_prompt(tokenizer, haystack, rng, length, depth))
    if args.copy_trials:
        pool = random_token_pool(tokenizer)
        report["copy"] = depth_grid(role, "copy", runner, lengths, cells, args, args.copy_trials,
                                    lambda rng, length, depth: copy_prompt(tokenizer, haystack, rng, length, depth, pool))
    for task, make in (("multikey", multikey_prompt), ("in_format", in_format_prompt)):
        by_length = {}
        for length in lengths:
            def cell(length=length, task=task, make=make):
                prompts = [make(tokenizer, haystack, random.Random(f"{args.seed}/{task}/{length}/{t}"),
                                length, depth, args.multikey_keys)
                           for t, depth in enumerate(depths(args.multikey_trials))]
                correct, right = score(runner, prompts, args.batch_tokens)
                return {"correct": correct, "answer_tokens": right, "trials": args.multikey_trials}
            result = cells.get(f"{role}/{task}/{length}", cell)
            by_length[str(length)] = result["correct"] / result["trials"]
        report[task] = {"keys": args.multikey_keys, "trials": args.multikey_trials, "by_length": by_length}
    return report


def main(args):
    from flashlm.data import load_tokenizer
    from flashlm.training.checkpoint import source_tokenizer

    start = time.monotonic()
    deadline = start + args.time_limit if args.time_limit else args.deadline
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = run_recipe(args.model)
    tokenizer_path = args.tokenizer or source_tokenizer(args.model)
    if tokenizer_path is None:
        raise SystemExit(f"--model {args.model} carries no tokenizer; pass --tokenizer")
    tokenizer = load_tokenizer(str(tokenizer_path))
    docs = held_out_documents(args, tokenizer_path, tokenizer, recipe)
    haystack = Haystack(docs, tokenizer.eos_token_id)
    use_autocast = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast)
    lengths = sorted(args.lengths or [args.seq_len])
    before_lengths = sorted(args.before_lengths or lengths)
    out = Path(args.out) if args.out else Path(args.model) / "long_context.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("seq_len", "windows", "first_bucket", "depths", "trials",
                                               "copy_trials", "multikey_keys", "multikey_trials", "seed", "data")}
    models = {"after": args.model, "before": args.before}
    key = json.dumps({"models": {k: v and model_identity(v) for k, v in models.items()}, "lengths": lengths,
                      "before_lengths": before_lengths, "settings": settings, "autocast": use_autocast})
    cells = Cells(out.with_name(out.name + ".partial.json"), key)
    report = {"model": str(args.model), "before_model": args.before and str(args.before), "seq_len": args.seq_len,
              "lengths": lengths, "before_lengths": before_lengths if args.before else [], "settings": settings,
              "held_out": {"documents": len(docs), "tokens": sum(len(d) for d in docs),
                           "at_least_seq_len": sum(len(d) >= args.seq_len for d in docs)},
              "data": args.data or "the run's held-out documents", "autocast": "bf16" if use_autocast else "none",
              "device": str(device), "environment": environment(device)}
    for role, path, role_lengths in (("after", args.model, lengths), ("before", args.before, before_lengths)):
        if path is None:
            report[role] = None
            continue
        model = load_model(path, device, args.mlp_chunk_size)
        runner = Runner(model, device, autocast, deadline)
        try:
            report[role] = {"model": str(path), "rope_theta": model.config.rope_theta,
                            "rope_scaling": model.config.rope_scaling,
                            "max_position_embeddings": model.config.max_position_embeddings,
                            **evaluate(role, runner, tokenizer, docs, haystack, role_lengths, cells, args)}
        finally:
            runner.close()
            del model, runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["seconds"] = time.monotonic() - start
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(summary(report))
    if args.plots:
        plot_needle_heatmap(report["after"]["passkey"], out.with_name(out.stem + "_passkey.png"),
                            f"passkey accuracy, {report['model']}")
        curves = [(role, report[role]["loss_by_position"], 0, role == "before")
                  for role in ("before", "after") if report[role]]
        plot_loss_curves(curves, out.with_name(out.stem + "_loss.png"), f"loss by position at {args.seq_len}")
    print(summary(report))
    print(f"wrote {out}")
    return report


def percent(x):
    return "-" if x is None else f"{x:.0%}"


def summary(report):
    """Markdown: loss by position, the passkey grid, multi-key and code-facts accuracy, and the
    copy grid when it was run, before and after."""
    roles = [r for r in ("before", "after") if report[r]]
    lines = [f"Long-context evaluation of {report['model']}"
             + (f" (before: {report['before_model']})" if report["before_model"] else "")
             + f", {report['held_out']['documents']} held-out documents ({report['held_out']['tokens']:,} tokens).",
             "", "Loss by position at " + f"{report['seq_len']} tokens:", "",
             "| positions | " + " | ".join(f"{r} loss" for r in roles) + " |", "|---|" + "---|" * len(roles)]
    buckets = {r: {(b["start"], b["end"]): b["loss"] for b in report[r]["loss_by_position"]["buckets"]} for r in roles}
    for edge in buckets[roles[-1]]:
        cells = " | ".join(f"{buckets[r][edge]:.3f}" if edge in buckets[r] else "-" for r in roles)
        lines.append(f"| {edge[0]}-{edge[1]} | {cells} |")
    for r in roles:
        p = report[r]["passkey"]
        lines += ["", f"Passkey accuracy, {r} ({p['trials']} trials a cell; rows: length, columns: depth):", "",
                  "| length | " + " | ".join(f"{d:.2f}" for d in p["depths"])
                  + " | all | multi-key | code facts |", "|---|" + "---|" * (len(p["depths"]) + 3)]
        for length in p["lengths"]:
            row = " | ".join(percent(a) for a in p["accuracy"][str(length)])
            lines.append(f"| {length} | {row} | {percent(p['by_length'][str(length)])} | "
                         f"{percent(report[r]['multikey']['by_length'][str(length)])} | "
                         f"{percent(report[r]['in_format']['by_length'][str(length)])} |")
        c = report[r].get("copy")
        if c:
            lines += ["", f"Copy accuracy (the training task), {r} ({c['trials']} trials a cell; answer tokens "
                      "in parentheses):", "", "| length | " + " | ".join(f"{d:.2f}" for d in c["depths"]) + " | all |",
                      "|---|" + "---|" * (len(c["depths"]) + 1)]
            for length in c["lengths"]:
                row = " | ".join(f"{percent(a)} ({percent(t)})" for a, t in
                                 zip(c["accuracy"][str(length)], c["answer_token_accuracy"][str(length)]))
                lines.append(f"| {length} | {row} | {percent(c['by_length'][str(length)])} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib (pip install matplotlib, or the test extra: "
                         "pip install -e '.[test]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_needle_heatmap(passkey, path, title):
    """A depth x length heat map of passkey accuracy (``report[role]["passkey"]``) as a PNG."""
    plt = _pyplot()
    lengths = passkey["lengths"]
    grid = [[passkey["accuracy"][str(length)][d] for length in lengths] for d in range(len(passkey["depths"]))]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.4 * len(grid) + 1.8))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for d, row in enumerate(grid):
        for i, value in enumerate(row):
            ax.text(i, d, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{length // 1024}K" if length >= 1024 else str(length) for length in lengths])
    ax.set_yticks(range(len(grid)), [f"{d:.2f}" for d in passkey["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title} ({passkey['trials']} trials a cell)", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(curves, path, title):
    """Loss by position bucket as a PNG, one line per (label, ``loss_by_position``, color index,
    dashed): a dashed line is a model before its stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, loss, color, dashed in curves:
        ends = [b["end"] for b in loss["buckets"]]
        ax.plot(ends, [b["loss"] for b in loss["buckets"]], marker="o", markersize=3, label=label,
                color=f"C{color}", linestyle="--" if dashed else "-")
    ax.set_xscale("log", base=2)
    ticks = sorted({b["end"] for _, loss, _, _ in curves for b in loss["buckets"]})
    ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("position (end of bucket, tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="flashlm run directory or checkpoint, or a Hugging Face directory")
    p.add_argument("--before", help="the model --model started from, evaluated on the same prompts")
    p.add_argument("--seq-len", type=int, required=True, help="loss-by-position window")
    p.add_argument("--lengths", type=int, nargs="+", help="retrieval prompt lengths (default: --seq-len)")
    p.add_argument("--before-lengths", type=int, nargs="+", help="retrieval lengths for --before (default: --lengths)")
    p.add_argument("--tokenizer", help="default: the run's tokenizer, or the Hugging Face directory")
    p.add_argument("--data", help="held-out documents (jsonl, text files, folder or glob); "
                                  "default: the run's eval split")
    p.add_argument("--cache-dir", default=".cache/data", help="token cache for --data ('none': off)")
    p.add_argument("--windows", type=int, default=8, help="loss-by-position windows, at most")
    p.add_argument("--first-bucket", type=int, default=256, help="end of the first position bucket")
    p.add_argument("--depths", type=int, default=10, help="needle depths, evenly spread over 0..1")
    p.add_argument("--trials", type=int, default=20, help="passkey trials per (length, depth)")
    p.add_argument("--copy-trials", type=int, default=0,
                   help="copy-task trials per (length, depth): the training task in held-out text (0: off)")
    p.add_argument("--multikey-keys", type=int, default=4, help="needles in a multi-key (and a code-facts) prompt")
    p.add_argument("--multikey-trials", type=int, default=20, help="multi-key (and code-facts) trials per length")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per forward pass for short prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--mlp-chunk-size", type=int, default=16384, help="tokens per MLP chunk (memory); 0: whole")
    p.add_argument("--time-limit", type=float, help="seconds; stop before a batch that would run past it")
    p.add_argument("--plots", action="store_true", help="write the heat map and loss curves (needs matplotlib)")
    p.add_argument("--out", help="JSON report path")
    args = p.parse_args(argv)
    args.deadline = None  # run_ladder sets a monotonic deadline shared with its training stages
    if args.cache_dir == "none":
        args.cache_dir = None
    if args.copy_trials < 0:
        p.error(f"--copy-trials={args.copy_trials}: must be 0 (off) or more")
    if args.multikey_keys > len(NAMES) or args.multikey_keys < 1:
        p.error(f"--multikey-keys={args.multikey_keys}: must be in [1, {len(NAMES)}]")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except TimeLimit as e:
        raise SystemExit(f"stopped at the time limit ({e}); run the same command again to continue")
