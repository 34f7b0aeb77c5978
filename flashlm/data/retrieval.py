"""Synthetic long-range retrieval planted into packed training blocks (``data.retrieval_share``).

A long-context stage learns to use its context only if something in the data needs it. In a
seeded share of the training blocks this writes, inside the block's longest segment (one
document, so document masking never hides the fact from its question), one to four facts at
random depths and, at the segment's end, a question about one of them followed by its answer::

    ..._fact_q7k2x = "3fa90c"...          (anywhere in the segment, overwriting its tokens)
    ..._fact_q7k2x = "3fa90c"             (the segment's last tokens)

The question repeats the start of its fact's line, so answering it is continuing the earlier
line that begins the same way, as a passkey or multi-key prompt asks (find where the query was
said before and read on), with the name as the only part that tells the facts apart. An earlier
form asked ``assert _fact_q7k2x == "``. At 1/16 scale on the CPU both forms were learned
equally well and neither carried over to passkey (results/ladder/experiments/tiny_retrieval_mix.md).

The format is Python-like, matching the code corpus, and unlike the evaluation's prompts in
everything but the task: English sentences there, assignments here; decimal numbers there,
hexadecimal strings with a letter here; names from a word list there, random letters and digits here. So the
evaluation measures retrieval the model learned, not the template it memorized.

``data.retrieval_kind: spans`` plants no template at all: it copies one to ``max_spans``
(``data.retrieval_max_spans``, default 4) random spans of the segment (16 to 48 tokens each)
to random later places in it, over the text there. Predicting a copy past its first tokens
means finding where the text now being read appeared before and reading on from there: the
skill every retrieval prompt asks for, taught on the corpus's own text, at every distance the
block allows, with nothing to memorize.

``random_spans`` is the same with each source, after its first 2-6 tokens (a cue kept from the
document; ``data.retrieval_cue_tokens`` sets the range, and ``data.retrieval_unique_cue``
makes each cue the shortest in the range that occurs nowhere else in the text before its copy),
overwritten by random tokens (none of the tokenizer's special tokens); the copy
repeats cue and random tokens. A copy's first random token can be predicted only by matching the
cue, ordinary tokens that also occur elsewhere (as "The pass key is" before a key), and the rest
only by reading the source: the induction task. At 1/16 scale it was the only mix that gave
passkey hits (results/ladder/experiments/tiny_retrieval_mix.md).

Planting happens after packing and touches the training split only; the held-out split is never
changed. The same seed plants the same facts (or spans) in the same blocks.
"""

from __future__ import annotations

import string

import numpy as np

FACT = '\n_fact_{name} = "{value}"\n'
QUESTION = "\n_fact_{name} = \""
ANSWER = '{value}"\n'
MAX_FACTS = 4
KINDS = ("facts", "spans", "random_spans")
SPAN_TOKENS = (16, 48)  # a copied span's length, inclusive
MAX_SPANS = 4  # the default of data.retrieval_max_spans
CUE_TOKENS = (2, 6)  # random_spans: a source's first tokens kept from the document, inclusive (the default)
MIN_RANDOM_TOKENS = 4  # random_spans: the fewest random tokens a source keeps after its cue
_NAME_CHARS = string.ascii_lowercase + string.digits


def longest_segment(starts: np.ndarray) -> tuple[int, int]:
    """(start, end) columns of the longest segment of a block whose segment starts are ``starts``."""
    edges = np.append(np.flatnonzero(starts | (np.arange(len(starts)) == 0)), len(starts))
    i = int(np.argmax(np.diff(edges)))
    return int(edges[i]), int(edges[i + 1])


def fact_fields(rng: np.random.Generator, n_facts: int) -> tuple[list[str], list[str]]:
    """(names, values) of ``n_facts`` facts: distinct names of five letters and digits, values of
    six hex digits with at least one letter."""
    names: list[str] = []
    while len(names) < n_facts:
        name = "".join(rng.choice(list(_NAME_CHARS), 5))
        if name not in names:
            names.append(name)
    values = []
    while len(values) < n_facts:  # never all decimal digits, as the evaluation's numbers are
        value = "".join(rng.choice(list("0123456789abcdef"), 6))
        if not value.isdigit():
            values.append(value)
    return names, values


def _fact_texts(rng: np.random.Generator, n_facts: int) -> tuple[list[str], str]:
    """(the facts, the question with its answer) for ``n_facts`` facts; the question asks for
    the first."""
    names, values = fact_fields(rng, n_facts)
    facts = [FACT.format(name=n, value=v) for n, v in zip(names, values)]
    return facts, QUESTION.format(name=names[0]) + ANSWER.format(value=values[0])


def plant_retrieval(blocks: np.ndarray, starts: np.ndarray, tokenizer, share: float, seed: int,
                    kind: str = "facts", max_spans: int = MAX_SPANS, cue_tokens: tuple[int, int] = CUE_TOKENS,
                    unique_cue: bool = False) -> int:
    """Plant facts and a question, or span copies (``kind``, see the module docstring; 1 to
    ``max_spans`` copies a block; ``cue_tokens`` and ``unique_cue``: a random_spans cue's length,
    see ``_copy_spans``), in ``round(share * len(blocks))`` seeded blocks, in place.
    Returns the number of blocks planted; a block whose longest segment cannot hold them with
    room to spare is skipped."""
    if kind not in KINDS:
        raise ValueError(f"retrieval kind {kind!r} must be one of {KINDS}")
    check_cue_tokens(cue_tokens)
    if share <= 0 or len(blocks) == 0:
        return 0
    rng = np.random.default_rng([seed, 7])
    chosen = rng.choice(len(blocks), size=round(share * len(blocks)), replace=False)
    if kind in ("spans", "random_spans"):
        pool = random_token_pool(tokenizer, blocks.dtype) if kind == "random_spans" else None
        return sum(_copy_spans(blocks[row], *longest_segment(starts[row]), rng, pool, max_spans, cue_tokens, unique_cue)
                   for row in np.sort(chosen))

    def encode(text):
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=blocks.dtype)

    planted = 0
    for row in np.sort(chosen):
        facts, question = _fact_texts(rng, int(rng.integers(1, MAX_FACTS + 1)))
        fact_ids, question_ids = [encode(f) for f in facts], encode(question)
        lo, hi = longest_segment(starts[row])
        room = hi - lo - len(question_ids)
        if room < 2 * sum(len(f) for f in fact_ids):
            continue
        blocks[row, hi - len(question_ids):hi] = question_ids
        # Facts at distinct, non-overlapping places in the segment before the question.
        for i, ids in enumerate(_spread(rng, room, [len(f) for f in fact_ids])):
            blocks[row, lo + ids:lo + ids + len(fact_ids[i])] = fact_ids[i]
        planted += 1
    return planted


def random_token_pool(tokenizer, dtype=np.int64) -> np.ndarray:
    """The ids a random span's tokens are drawn from: the whole vocabulary but the special tokens."""
    special = set(tokenizer.all_special_ids)
    return np.asarray([i for i in range(len(tokenizer)) if i not in special], dtype=dtype)


def _copy_spans(block: np.ndarray, lo: int, hi: int, rng: np.random.Generator, pool: np.ndarray | None = None,
                max_spans: int = MAX_SPANS, cue_tokens: tuple[int, int] = CUE_TOKENS, unique_cue: bool = False) -> bool:
    """Copy 1 to ``max_spans`` random spans of ``block[lo:hi]`` each to a random later place in
    it, in place; sources and copies never overlap, so every copy equals its source afterwards.
    With ``pool``, each source is first filled with tokens drawn from it past its first
    ``cue_tokens`` (a range) tokens: a length drawn from the range, or with ``unique_cue`` the
    shortest in it whose tokens occur nowhere else in the segment before the copy
    (``unique_cue_length``). False (nothing changed) when the segment is shorter than four
    times a span."""
    length = int(rng.integers(SPAN_TOKENS[0], SPAN_TOKENS[1] + 1))
    n = min(int(rng.integers(1, max_spans + 1)), (hi - lo) // (4 * length))
    if n == 0:
        return False
    places = sorted(_spread(rng, hi - lo, [length] * (2 * n)))
    pairs = rng.permutation(2 * n).reshape(n, 2)  # any two places; the earlier is the source
    for a, b in pairs:
        src, dst = lo + places[min(a, b)], lo + places[max(a, b)]
        if pool is not None:  # the first few tokens stay the document's own: a cue, as in a prompt
            if unique_cue:
                cue = unique_cue_length(block, lo, src, dst, *cue_tokens)
            else:
                cue = int(rng.integers(cue_tokens[0], cue_tokens[1] + 1))
            block[src + cue:src + length] = rng.choice(pool, length - cue)
        block[dst:dst + length] = block[src:src + length]
    return True


def unique_cue_length(block: np.ndarray, lo: int, src: int, dst: int, shortest: int, longest: int) -> int:
    """The fewest tokens from ``src`` on, at least ``shortest``, that occur in ``block[lo:dst]``
    only at ``src``: a cue that points at one place, as "The pass key is" does in a passkey
    prompt. ``longest`` when none up to it is unique (repeated code can be)."""
    starts = lo + np.flatnonzero(block[lo:dst] == block[src])  # where the cue's first token occurs
    for k in range(1, longest + 1):
        if k > 1:
            starts = starts[starts + k <= dst]
            starts = starts[block[starts + k - 1] == block[src + k - 1]]
        if k >= shortest and len(starts) == 1:
            return k
    return longest


def cue_tokens_problem(cue_tokens) -> str | None:
    """What is wrong with ``cue_tokens`` as a (min, max) range of cue lengths, None if nothing:
    it must leave every span at least ``MIN_RANDOM_TOKENS`` random tokens."""
    most = SPAN_TOKENS[0] - MIN_RANDOM_TOKENS
    ok = (isinstance(cue_tokens, (tuple, list)) and len(cue_tokens) == 2
          and all(isinstance(n, int) and not isinstance(n, bool) for n in cue_tokens)
          and 1 <= cue_tokens[0] <= cue_tokens[1] <= most)
    return None if ok else (f"must be two whole numbers [min, max] with 1 <= min <= max <= {most} (a span is "
                            f"at least {SPAN_TOKENS[0]} tokens, {MIN_RANDOM_TOKENS} of them random)")


def check_cue_tokens(cue_tokens) -> None:
    """Raise ValueError when ``cue_tokens_problem`` finds something wrong with ``cue_tokens``."""
    problem = cue_tokens_problem(cue_tokens)
    if problem:
        raise ValueError(f"retrieval cue tokens {cue_tokens!r} {problem}")


def _spread(rng: np.random.Generator, room: int, lengths: list[int]) -> list[int]:
    """Random, non-overlapping offsets in ``[0, room)`` for spans of ``lengths``, in the given
    order of spans (so the asked-for fact is at any depth relative to the others)."""
    free = room - sum(lengths)
    cuts = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    order = rng.permutation(len(lengths))
    offsets = [0] * len(lengths)
    used = 0
    for cut, i in zip(cuts, order):
        offsets[i] = int(cut) + used
        used += lengths[i]
    return offsets
