"""The data pipeline on small generated corpora: packing, splits, order, cache, resume,
sharding, sources and bad input.

Expectations are computed independently of ``flashlm.data``: documents are generated here,
tokenized here with the tokenizer directly, and packed blocks are decoded back to text (the
byte-level tokenizer round-trips exactly), so a test compares the pipeline's output with the
texts it was given.
"""

import collections
import json
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import flashlm.data.documents as documents
from flashlm.data import (
    DataConfig, DataError, build_eval_loader, build_train_loader, check_tokenizer_fits, iter_texts, load_tokenizer,
    make_batch, prepare_data, unigram_entropy,
)
from flashlm.data.loader import EvalLoader, TrainLoader
from flashlm.data.packing import PackedSplit, pack
from flashlm.data.retrieval import SPAN_TOKENS, _copy_spans, longest_segment, plant_retrieval, unique_cue_length
from flashlm.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data" / "tokenizer")
WORDS = ("the whale sea ship captain Ahab harpoon Emma Harriet letter marriage fortune "
         "drawing-room café naïve — “quoted” morning evening walked said, very; much! well?").split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def make_docs(seed, n, max_words=120):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        docs.append(f"Document {i}. " + " ".join(words))  # unique: the index is in the text
    return docs


def write_jsonl(path, docs, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "extra": 1}) + "\n")
    return path


def config(path, tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(path=str(path), tokenizer=TOKENIZER, **kw)


def expected_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def segments(split):
    """The packed stream cut at document starts: a list of token lists."""
    stream, starts = split.blocks.reshape(-1), split.starts.reshape(-1)
    cuts = list(np.flatnonzero(starts)) + [len(stream)]
    return [stream[a:b].tolist() for a, b in zip(cuts, cuts[1:])]


def decoded_docs(split, tok):
    """Texts of the complete documents in a split (the last one may be cut by the tail)."""
    segs = segments(split)
    out = []
    for s in segs:
        if s[-1] == tok.eos_token_id:
            out.append(tok.decode(s[:-1]))
    return out


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


# --- packing --------------------------------------------------------------------------


def test_packing_eos_between_documents_and_nothing_lost(tok, tmp_path):
    docs = make_docs(seed=1, n=40)
    cfg = config(write_jsonl(tmp_path / "c.jsonl", docs), tmp_path, seed=3)
    data = prepare_data(cfg, tok, seq_len=64)
    eos = tok.eos_token_id
    expect = {d: expected_ids(tok, d) for d in docs}
    total = sum(len(v) for v in expect.values())
    assert data.train.n_tokens == total
    assert data.train.blocks.size == total // 64 * 64  # only the final partial block is dropped
    segs = segments(data.train)
    # Every document appears exactly once, whole and in order, EOS-terminated; only the last
    # one may be cut short by the dropped tail.
    seen = collections.Counter()
    for s in segs[:-1]:
        assert s.count(eos) == 1 and s[-1] == eos
        text = tok.decode(s[:-1])
        assert expect[text] == s
        seen[text] += 1
    last_missing = [d for d in docs if seen[d] == 0]
    assert len(last_missing) == 1 and all(v == 1 for v in seen.values())
    assert expect[last_missing[0]][: len(segs[-1])] == segs[-1]


def test_batch_positions_doc_ids_and_cu_seqlens():
    rng = np.random.default_rng(0)
    lengths = [1, 5, 63, 64, 65, 1, 1, 200, 7, 30, 2, 130, 9]
    counter = iter(range(1, 10**6))
    docs = [np.array([next(counter) for _ in range(n)], dtype=np.uint32) for n in lengths]
    order = rng.permutation(len(docs))
    split = pack(docs, order, seq_len=32)
    doc_of = {int(t): i for i, d in enumerate(docs) for t in d}  # tokens are unique
    batch = make_batch(split.blocks, split.starts)
    ids, pos, seg = batch["input_ids"], batch["position_ids"], batch["doc_ids"]
    assert ids.shape == pos.shape == seg.shape == (len(split), 32)
    assert ids.dtype == pos.dtype == seg.dtype == torch.int64
    # Expected values from a plain loop over each row.
    cu, flat_offset = [0], 0
    for r in range(ids.shape[0]):
        p = s = -1
        prev = None
        for c in range(32):
            d = doc_of[int(ids[r, c])]
            if d != prev:
                p, s, prev = 0, s + 1, d
                if c > 0:
                    cu.append(flat_offset + c)
            else:
                p += 1
            assert pos[r, c] == p and seg[r, c] == s
        flat_offset += 32
        cu.append(flat_offset)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == cu
    assert batch["max_seqlen"] == max(np.diff(cu))
    # No token lost or repeated across blocks.
    stream = np.concatenate([docs[i] for i in order])
    assert np.array_equal(split.blocks.reshape(-1), stream[: len(split) * 32])


def test_one_epoch_visits_every_block_once():
    split = pack([np.arange(i * 1000, i * 1000 + 50, dtype=np.uint32) for i in range(48)], range(48), 16)
    assert len(split) == 150
    loader = TrainLoader(split, batch_size=5, seed=7)
    rows = torch.cat([b["input_ids"] for b in batches(loader, loader.batches_per_epoch)])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, split.blocks.astype(np.int64).tolist()))
    assert loader.state_dict()["epoch"] == 0
    next(loader)
    assert loader.state_dict()["epoch"] == 1


# --- order, splits, sharding ----------------------------------------------------------------


def test_deterministic_given_seed_and_different_across_seeds(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=2, n=60))

    def first_batches(seed, cache):
        cfg = config(path, tmp_path, seed=seed, eval_fraction=0.1, cache_dir=cache)
        return batches(build_train_loader(prepare_data(cfg, tok, seq_len=32), batch_size=4), 6)

    a = first_batches(5, str(tmp_path / "cache"))
    assert_batches_equal(a, first_batches(5, None))  # and cached == freshly tokenized
    b = first_batches(6, str(tmp_path / "cache"))
    assert not torch.equal(a[0]["input_ids"], b[0]["input_ids"])


def test_held_out_split_is_disjoint_by_document(tok, tmp_path):
    docs = make_docs(seed=3, n=50, max_words=30)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    data = prepare_data(config(path, tmp_path, eval_fraction=0.2, seed=1), tok, seq_len=16)
    train, evals = set(decoded_docs(data.train, tok)), set(decoded_docs(data.eval, tok))
    assert not train & evals
    assert data.eval.n_docs == 10 and data.train.n_docs == 40
    assert len(train) >= 39 and len(evals) >= 9 and train | evals <= set(docs)
    other = prepare_data(config(path, tmp_path, eval_fraction=0.2, seed=2), tok, seq_len=16)
    assert set(decoded_docs(other.eval, tok)) != evals
    counted = prepare_data(config(path, tmp_path, eval_docs=3, seed=1), tok, seq_len=16)
    assert counted.eval.n_docs == 3


def test_rank_shards_are_disjoint_and_even():
    split = pack([np.arange(i * 100, i * 100 + 40, dtype=np.uint32) for i in range(50)], range(50), 8)
    world = 3
    loaders = [TrainLoader(split, batch_size=4, seed=0, rank=r, world_size=world) for r in range(world)]
    per_rank = [torch.cat([b["input_ids"] for b in batches(ld, ld.batches_per_epoch)]) for ld in loaders]
    assert len({len(x) for x in per_rank}) == 1
    owned = [set(map(tuple, x.tolist())) for x in per_rank]
    for i in range(world):
        for j in range(i + 1, world):
            assert not owned[i] & owned[j]
    evals = [EvalLoader(split, batch_size=3, rank=r, world_size=world) for r in range(world)]
    eval_rows = [set(tuple(row) for b in ev for row in b["input_ids"].tolist()) for ev in evals]
    assert len({len(e) for e in evals}) == 1
    assert sum(len(e) for e in eval_rows) == len(split) // world * world
    assert not eval_rows[0] & eval_rows[1]


def test_resume_on_another_number_of_processes():
    """Two ranks consume k steps; resumed on 1 or 4 ranks from that state, the new ranks take the
    next unconsumed blocks of the same epoch order: no block twice, none skipped, and the next
    epoch starts where the uninterrupted schedule's would."""
    split = pack([np.arange(i * 100, i * 100 + 40, dtype=np.uint32) for i in range(60)], range(60), 8)
    order = np.random.default_rng([0, 1, 0]).permutation(len(split))
    two = [TrainLoader(split, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [row for ld in two for b in batches(ld, 5) for row in b["input_ids"].tolist()]
    state = json.loads(json.dumps(two[0].state_dict()))
    assert state["consumed"] == 20 and two[1].state_dict() == state
    for world in (1, 4):
        resumed = [TrainLoader(split, batch_size=2, seed=0, rank=r, world_size=world) for r in range(world)]
        for ld in resumed:
            ld.load_state_dict(state)
        steps = (len(split) - 20) // (2 * world)
        rest = [row for ld in resumed for b in batches(ld, steps) for row in b["input_ids"].tolist()]
        rows = sorted(map(tuple, seen + rest))
        used = 20 + steps * 2 * world
        assert rows == sorted(tuple(split.blocks[i].astype(np.int64).tolist()) for i in order[:used])
        assert resumed[0].state_dict()["epoch"] == 0
        next(resumed[0])
        assert resumed[0].state_dict()["epoch"] == 1  # the tail that fills no step is dropped
    old = {"epoch": 0, "batch": 5, "seed": 0, "batch_size": 2, "world_size": 2, "n_blocks": len(split)}
    legacy = TrainLoader(split, batch_size=2, seed=0, rank=0, world_size=2)
    legacy.load_state_dict(old)  # a state written before positions were recorded
    assert legacy.consumed == 20


def test_eval_loader_repeats_the_same_batches(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=4, n=40))
    data = prepare_data(config(path, tmp_path, eval_fraction=0.25), tok, seq_len=32)
    ev = build_eval_loader(data, batch_size=3)
    first, second = list(ev), list(ev)
    assert len(first) == len(ev) == math.ceil(len(data.eval) / 3)
    assert_batches_equal(first, second)


# --- resume ---------------------------------------------------------------------------


def test_resume_continues_with_the_same_batches(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=5, n=30))
    data = prepare_data(config(path, tmp_path, seed=11), tok, seq_len=32)
    loader = build_train_loader(data, batch_size=4)
    n = loader.batches_per_epoch + 3  # the run crosses an epoch boundary
    whole = batches(loader, 2 * n)
    first = build_train_loader(data, batch_size=4)
    batches(first, n)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = build_train_loader(data, batch_size=4)
    resumed.load_state_dict(state)
    assert_batches_equal(batches(resumed, n), whole[n:])
    with pytest.raises(DataError, match="batch_size=4 but this loader has batch_size=2"):
        build_train_loader(data, batch_size=2).load_state_dict(state)


# --- cache ----------------------------------------------------------------------------


def test_cache_reuse_and_invalidation(tok, tmp_path, monkeypatch):
    docs = make_docs(seed=6, n=20)
    path = write_jsonl(tmp_path / "corpus" / "c.jsonl", docs)
    cfg = config(path.parent, tmp_path)
    calls = []
    real = documents.tokenize_documents
    monkeypatch.setattr(documents, "tokenize_documents", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prepare_data(cfg, tok, seq_len=32)
    assert calls == [1] and not first.from_cache
    assert (first.cache_entry / "tokens.npy").is_file()
    second = prepare_data(cfg, tok, seq_len=64)  # packing settings do not key the cache
    assert calls == [1] and second.from_cache and second.cache_entry == first.cache_entry
    entries = {p.name for p in Path(cfg.cache_dir).iterdir()}
    assert entries == {first.cache_entry.name}  # no leftover temporary folders
    write_jsonl(path, docs[:-1] + [docs[-1] + " changed"])
    third = prepare_data(cfg, tok, seq_len=32)
    assert calls == [1, 1] and not third.from_cache and third.cache_entry != first.cache_entry


# --- synthetic retrieval --------------------------------------------------------------------


def test_retrieval_is_planted_in_one_document_of_a_share_of_training_blocks(tok, tmp_path):
    """Planted blocks differ from the plain packing only there; each holds, inside its longest
    segment, a question at the segment's end whose answer is a fact stated earlier in it. The
    held-out split and the other blocks are untouched, and the same seed plants the same."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=4, n=60, max_words=400))
    plain = prepare_data(config(path, tmp_path, eval_docs=5), tok, seq_len=512)
    mixed = prepare_data(config(path, tmp_path, eval_docs=5, retrieval_share=0.5), tok, seq_len=512)
    again = prepare_data(config(path, tmp_path, eval_docs=5, retrieval_share=0.5), tok, seq_len=512)
    assert np.array_equal(mixed.train.blocks, again.train.blocks)
    assert np.array_equal(mixed.eval.blocks, plain.eval.blocks)
    assert np.array_equal(mixed.train.starts, plain.train.starts)
    changed = [r for r in range(len(plain.train)) if not np.array_equal(mixed.train.blocks[r], plain.train.blocks[r])]
    n = len(plain.train)
    assert 0 < len(changed) == mixed.train.retrieval_blocks <= round(0.5 * n)
    assert mixed.train.retrieval_blocks >= round(0.5 * n) // 2  # most blocks have room
    assert f"{len(changed)} with a synthetic retrieval" in mixed.summary()
    for r in changed:
        starts = mixed.train.starts[r]
        edges = list(np.flatnonzero(starts | (np.arange(512) == 0))) + [512]
        lo, hi = max(zip(edges, edges[1:]), key=lambda e: e[1] - e[0])
        segment = tok.decode(mixed.train.blocks[r, lo:hi].tolist())
        question = re.search(r'\n_fact_([a-z0-9]{5}) = "([0-9a-f]{6})"\n$', segment)
        assert question, segment[-80:]
        name, value = question.groups()
        assert not value.isdigit()  # the evaluation's values are decimal numbers
        facts = re.findall(r'\n_fact_([a-z0-9]{5}) = "([0-9a-f]{6})"\n', segment[:question.start() + 1])
        assert 1 <= len(facts) <= 4 and (name, value) in facts and len({f[0] for f in facts}) == len(facts)
        # outside the longest segment, nothing changed
        outside = np.ones(512, bool)
        outside[lo:hi] = False
        assert np.array_equal(mixed.train.blocks[r][outside], plain.train.blocks[r][outside])


def test_span_copies_repeat_earlier_text_of_the_same_document(tok, tmp_path):
    """retrieval_kind: spans changes a share of training blocks only inside their longest
    segment; the held-out split is untouched and the same seed copies the same spans."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=4, n=60, max_words=400))
    plain = prepare_data(config(path, tmp_path, eval_docs=5), tok, seq_len=512)
    spans = config(path, tmp_path, eval_docs=5, retrieval_share=0.5, retrieval_kind="spans")
    mixed, again = prepare_data(spans, tok, seq_len=512), prepare_data(spans, tok, seq_len=512)
    assert np.array_equal(mixed.train.blocks, again.train.blocks)
    assert np.array_equal(mixed.eval.blocks, plain.eval.blocks)
    changed = [r for r in range(len(plain.train)) if not np.array_equal(mixed.train.blocks[r], plain.train.blocks[r])]
    assert 0 < len(changed) == mixed.train.retrieval_blocks <= round(0.5 * len(plain.train))
    for r in changed:
        lo, hi = longest_segment(mixed.train.starts[r])
        diff = np.flatnonzero(mixed.train.blocks[r] != plain.train.blocks[r])
        assert lo <= diff.min() and diff.max() < hi


def test_each_copied_span_equals_an_intact_earlier_span():
    """On a block of distinct tokens every overwritten run is a copy: the run equals a span of
    16 to 48 consecutive original tokens that ends before the run starts and is itself intact."""
    rng = np.random.default_rng(0)
    lengths, counts = set(), set()
    for trial in range(200):
        lo, hi = int(rng.integers(0, 50)), int(rng.integers(300, 2000))
        block = np.arange(2100)
        assert _copy_spans(block, lo, hi, rng) == (np.any(block != np.arange(2100)))
        changed = np.flatnonzero(block != np.arange(2100))
        assert changed.size == 0 or (lo <= changed.min() and changed.max() < hi)
        runs = np.split(changed, np.flatnonzero(np.diff(changed) > 1) + 1) if changed.size else []
        # runs of copies may touch each other; split them where the copied values stop being consecutive
        pieces = []
        for run in runs:
            values = block[run]
            cuts = np.flatnonzero(np.diff(values) != 1) + 1
            pieces += np.split(run, cuts)
        for piece in pieces:
            src = block[piece[0]]
            n = len(piece)
            assert SPAN_TOKENS[0] <= n <= SPAN_TOKENS[1], n
            assert lo <= src and src + n <= piece[0]  # the source is earlier, in the segment
            assert np.array_equal(block[src:src + n], np.arange(src, src + n))  # and intact
            lengths.add(n)
        counts.add(len(pieces))
    assert len(lengths) > 10 and counts >= {1, 2, 3, 4}


def test_max_spans_sets_how_many_copies_a_block_gets():
    """retrieval_max_spans: 1 to N copies a block, each one the whole of a span's twin; N = 1
    gives exactly one, a larger N up to N (as many as the segment holds)."""
    rng = np.random.default_rng(2)
    for max_spans in (1, 16):
        counts = set()
        for trial in range(100):
            block = np.arange(40_000)
            assert _copy_spans(block, 0, 40_000, rng, max_spans=max_spans)
            changed = np.flatnonzero(block != np.arange(40_000))
            counts.add(len(np.split(changed, np.flatnonzero(np.diff(changed) > 1) + 1)))
        assert max(counts) == max_spans and (max_spans == 1 or len(counts) > 8), counts


def test_retrieval_max_spans_reaches_the_blocks_through_the_recipe(tok, tmp_path):
    """More copies a block through prepare_data: more of each planted block is changed."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=4, n=60, max_words=400))
    plain = prepare_data(config(path, tmp_path, eval_docs=5), tok, seq_len=512)
    changed = {}
    for spans in (1, 8):
        mixed = prepare_data(config(path, tmp_path, eval_docs=5, retrieval_share=1.0, retrieval_kind="spans",
                                    retrieval_max_spans=spans), tok, seq_len=512)
        changed[spans] = int((mixed.train.blocks != plain.train.blocks).sum())
    assert changed[8] > 2 * changed[1] > 0, changed


@pytest.mark.parametrize("cue_tokens", [(2, 6), (8, 12)])
def test_random_spans_repeat_a_cue_and_a_random_sequence(cue_tokens):
    """random_spans: each source keeps its first ``cue_tokens`` (a range) tokens of the document
    (the cue) and is random tokens from the pool after them; its copy, later, repeats cue and
    random tokens. So every random run has one twin, and the tokens before the later twin
    repeat the earlier twin's intact document tokens for a cue's length; every other changed
    token is a copy of an intact, earlier document token, and the rest is untouched."""
    rng = np.random.default_rng(1)
    pool = np.arange(5000, 5100)
    cues = []
    for trial in range(100):
        block = np.arange(1000)
        assert _copy_spans(block, 10, 990, rng, pool, cue_tokens=cue_tokens)
        random_at = np.flatnonzero(block >= 5000)
        runs = np.split(random_at, np.flatnonzero(np.diff(random_at) > 1) + 1)
        assert len(runs) and len(runs) % 2 == 0
        for run in runs:
            twins = [r for r in runs if r[0] != run[0] and np.array_equal(block[r], block[run])]
            assert len(twins) == 1, (trial, run[0])
            source, copy = min(run[0], twins[0][0]), max(run[0], twins[0][0])
            if copy != run[0]:
                continue
            cue = 0
            while block[source - cue - 1] == source - cue - 1 and block[copy - cue - 1] == source - cue - 1:
                cue += 1
            cues.append(cue)
        copied = np.flatnonzero((block < 5000) & (block != np.arange(1000)))
        assert np.all(block[copied] < copied) and np.all(block[block[copied]] == block[copied])
    assert min(cues) == cue_tokens[0] and max(cues) == cue_tokens[1], sorted(set(cues))


def test_retrieval_cue_tokens_is_checked_and_reaches_the_blocks(tok, tmp_path):
    """data.retrieval_cue_tokens: a range that leaves every span random tokens, named in the
    error otherwise; a longer cue through prepare_data leaves fewer tokens random."""
    for bad in ([0, 4], [6, 2], [4, 13], [3]):
        with pytest.raises(RecipeError, match=r"data.retrieval_cue_tokens=\[.*\] is invalid"):
            DataConfig(path="x", tokenizer="y", retrieval_cue_tokens=bad)
    with pytest.raises(ValueError, match=r"retrieval cue tokens \(4, 14\) must be"):
        plant_retrieval(np.arange(1000)[None], np.zeros((1, 1000), bool), tok, 1.0, 0, "random_spans",
                        cue_tokens=(4, 14))
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=4, n=60, max_words=400))
    plain = prepare_data(config(path, tmp_path, eval_docs=5), tok, seq_len=512)
    changed = {}
    for cue in ((2, 2), (12, 12)):
        mixed = prepare_data(config(path, tmp_path, eval_docs=5, retrieval_share=1.0, retrieval_kind="random_spans",
                                    retrieval_cue_tokens=cue), tok, seq_len=512)
        changed[cue] = int((mixed.train.blocks != plain.train.blocks).sum())
    assert 0 < changed[(12, 12)] < changed[(2, 2)], changed


def test_unique_cue_is_the_shortest_that_points_at_one_place():
    """retrieval_unique_cue: the cue length is the smallest k in [shortest, longest] whose k
    tokens from the source occur in block[lo:dst] at the source only (longest when none is),
    checked against a search over every window, on text of few distinct tokens where short
    cues recur."""
    rng = np.random.default_rng(3)
    lengths = set()
    for trial in range(300):
        block = rng.integers(0, 3, 400)
        lo = int(rng.integers(0, 20))
        src = int(rng.integers(lo, 200))
        dst = int(rng.integers(src + 20, 400))
        shortest, longest = sorted(int(x) for x in rng.integers(1, 13, 2))

        def unique(k):
            windows = np.lib.stride_tricks.sliding_window_view(block[lo:dst], k)
            return int((windows == block[src:src + k]).all(1).sum()) == 1

        expected = next((k for k in range(shortest, longest + 1) if unique(k)), longest)
        got = unique_cue_length(block, lo, src, dst, shortest, longest)
        assert got == expected, (trial, got, expected)
        lengths.add(got)
    assert len(lengths) > 5


def test_unique_cues_plant_through_the_recipe(tok, tmp_path):
    """retrieval_unique_cue reaches the planting through prepare_data: the same seed plants
    other cues than the drawn ones (the cue rule itself is tested above)."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=4, n=60, max_words=400))
    blocks = {}
    for unique in (False, True):
        data = prepare_data(config(path, tmp_path, eval_docs=5, retrieval_share=1.0, retrieval_kind="random_spans",
                                   retrieval_unique_cue=unique), tok, seq_len=512)
        assert data.train.retrieval_blocks > 0
        blocks[unique] = data.train.blocks
    assert not np.array_equal(blocks[False], blocks[True])


def test_retrieval_kinds_plant_through_the_recipe(tok, tmp_path):
    """Every kind changes the training blocks through prepare_data; random_spans only with
    tokens that are not special."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=4, n=60, max_words=400))
    plain = prepare_data(config(path, tmp_path, eval_docs=5), tok, seq_len=512)
    for kind in ("facts", "spans", "random_spans"):
        mixed = prepare_data(config(path, tmp_path, eval_docs=5, retrieval_share=0.5, retrieval_kind=kind), tok, seq_len=512)
        assert mixed.train.retrieval_blocks > 0 and not np.array_equal(mixed.train.blocks, plain.train.blocks), kind
    new = mixed.train.blocks[mixed.train.blocks != plain.train.blocks]
    assert not set(new.tolist()) & set(tok.all_special_ids)


def test_retrieval_share_is_for_plain_text_only(tmp_path):
    with pytest.raises(RecipeError, match="data.retrieval_share=0.1 is invalid: applies to kind: text"):
        DataConfig(path="x", tokenizer="y", streaming=True, eval_docs=1, retrieval_share=0.1)


# --- sources --------------------------------------------------------------------------


def test_sources_text_jsonl_parquet_arrow_agree(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(seed=7, n=12, max_words=40)
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i, d in enumerate(docs):
        (text_dir / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    (text_dir / "README.md").write_text("not data")  # unknown extensions in a folder are skipped
    jsonl = write_jsonl(tmp_path / "j" / "c.jsonl", docs, field="body")
    pq.write_table(pa.table({"body": docs[:6]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": docs[6:]}), tmp_path / "b.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "arrow"))
    sources = [
        dict(path=text_dir),
        dict(path=jsonl, text_field="body"),
        dict(path=tmp_path / "*.parquet", text_field="body"),
        dict(path=tmp_path / "arrow", format="arrow"),
    ]
    for src in sources:
        data = prepare_data(config(**src, tmp_path=tmp_path), tok, seq_len=8)
        got = decoded_docs(data.train, tok)  # all but at most the one cut by the tail
        assert len(got) >= len(docs) - 1 and len(set(got)) == len(got) and set(got) <= set(docs), src
        assert data.train.n_docs == len(docs) and data.train.n_tokens == sum(len(expected_ids(tok, d)) for d in docs)


def test_hub_format_through_load_dataset(tok, tmp_path, monkeypatch):
    # datasets.load_dataset resolves a local folder the way it resolves a hub name.
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(seed=10, n=20, max_words=20)
    (tmp_path / "hubds").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "hubds" / "train.parquet")
    cfg = config(tmp_path / "hubds", tmp_path, format="hub", eval_docs=2)
    first = prepare_data(cfg, tok, seq_len=8)
    assert first.train.n_docs == 18 and first.eval.n_docs == 2 and not first.from_cache
    got = decoded_docs(first.train, tok) + decoded_docs(first.eval, tok)
    assert len(got) >= 18 and set(got) <= set(docs)
    monkeypatch.setattr(documents, "tokenize_documents", None)  # a cache hit must not tokenize
    assert prepare_data(cfg, tok, seq_len=8).from_cache


def test_text_sample_by_paragraph_and_line(tmp_path):
    (tmp_path / "a.txt").write_text("one para\nstill one\n\n  \ntwo\n\n\nthree\n", encoding="utf-8")
    paras = list(iter_texts(str(tmp_path / "a.txt"), sample_by="paragraph"))
    assert [p.strip() for p in paras] == ["one para\nstill one", "two", "three"]
    assert list(iter_texts(str(tmp_path / "a.txt"), sample_by="line")) == ["one para", "still one", "two", "three"]


def test_streaming_matches_independent_packing_and_shards(tok, tmp_path):
    docs = make_docs(seed=8, n=30, max_words=40)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    s = 16
    cfg = config(path, tmp_path, streaming=True, eval_docs=4, shuffle_buffer=1)
    data = prepare_data(cfg, tok, seq_len=s)
    assert data.eval.n_docs == 4
    stream = [t for d in docs[4:] for t in expected_ids(tok, d)]
    loader = build_train_loader(data, batch_size=2)
    n = len(stream) // s // 2
    got = torch.cat([b["input_ids"] for b in batches(loader, n)]).reshape(-1).tolist()
    assert got == stream[: n * 2 * s]
    # Shuffled, sharded, resumed.
    cfg = config(path, tmp_path, streaming=True, eval_docs=4, shuffle_buffer=4, seed=1)
    data = prepare_data(cfg, tok, seq_len=s)
    loaders = [build_train_loader(data, batch_size=2, rank=r, world_size=2) for r in range(2)]
    first = [batches(ld, 3) for ld in loaders]
    texts = [{tok.decode(seg[:-1]) for b in bs for row in b["input_ids"].tolist()
              for seg in _complete_segments(row, tok.eos_token_id)} for bs in first]
    assert not texts[0] & texts[1]
    resumed = build_train_loader(data, batch_size=2, rank=1, world_size=2)
    again = build_train_loader(data, batch_size=2, rank=1, world_size=2)
    batches(again, 1)
    resumed.load_state_dict(again.state_dict())
    assert_batches_equal(batches(resumed, 2), first[1][1:])


def _complete_segments(row, eos):
    out, cur, started = [], [], False
    for t in row:
        cur.append(t)
        if t == eos:
            if started:
                out.append(cur)
            cur, started = [], True
    return out


# --- tokenizer and statistics ---------------------------------------------------------


def test_load_tokenizer_sources_and_fit(tok, tmp_path):
    alone = tmp_path / "only" / "tokenizer.json"
    alone.parent.mkdir()
    shutil.copy(Path(TOKENIZER) / "tokenizer.json", alone)
    bare = load_tokenizer(str(alone))
    assert bare.eos_token == "</s>" and len(bare) == len(tok)
    text = "It is a truth universally acknowledged — naïve café."
    assert bare(text)["input_ids"] == tok(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    check_tokenizer_fits(tok, len(tok))
    with pytest.raises(DataError, match=f"has {len(tok)} tokens.*vocab_size is {len(tok) - 1}"):
        check_tokenizer_fits(tok, len(tok) - 1)
    with pytest.raises(DataError, match="no such file or folder"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))


def test_unigram_entropy():
    k = 37
    uniform = PackedSplit(np.tile(np.arange(k, dtype=np.uint16), 8).reshape(-1, k), None, 0, 0)
    data = type("D", (), {"train": uniform})()
    assert unigram_entropy(data) == pytest.approx(math.log(k), rel=1e-12)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 50, size=(20, 10)).astype(np.uint16)
    counts = collections.Counter(blocks.reshape(-1).tolist())
    expect = -sum(c / 200 * math.log(c / 200) for c in counts.values())
    data = type("D", (), {"train": PackedSplit(blocks, None, 0, 0)})()
    assert unigram_entropy(data) == pytest.approx(expect, rel=1e-12)


def test_bundled_corpus_and_tokenizer(tok):
    texts = list(iter_texts(str(ROOT / "data" / "corpus")))
    assert len(texts) == 405 and all(t.strip() for t in texts)
    assert not any("Gutenberg" in t for t in texts)
    assert len(tok) == 4096
    sample = texts[100][:2000]
    assert tok.decode(tok(sample)["input_ids"]) == sample


# --- bad input ------------------------------------------------------------------------


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        prepare_data(config(tmp_path / "nope", tmp_path), tok, seq_len=8)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty data file"):
        prepare_data(config(tmp_path / "empty.jsonl", tmp_path), tok, seq_len=8)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        prepare_data(config(tmp_path / "folder", tmp_path), tok, seq_len=8)
    with pytest.raises(DataError, match="no files match"):
        prepare_data(config(tmp_path / "*.parquet", tmp_path), tok, seq_len=8)
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare_data(config(tmp_path / "blank.jsonl", tmp_path), tok, seq_len=8)


def test_jsonl_line_without_field_names_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "no text here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: no 'text' field"):
        prepare_data(config(path, tmp_path), tok, seq_len=8)
    path.write_text('{"text": "fine"}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' is a int"):
        prepare_data(config(path, tmp_path), tok, seq_len=8)
    path.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        prepare_data(config(path, tmp_path), tok, seq_len=8)
    pq = tmp_path / "p.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pqm
    pqm.write_table(pa.table({"body": ["x"]}), pq)
    with pytest.raises(DataError, match=r"p\.parquet: no 'text' column"):
        prepare_data(config(pq, tmp_path), tok, seq_len=8)


def test_text_that_is_not_utf8_names_the_file(tok, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(line 1"):
        prepare_data(config(path, tmp_path), tok, seq_len=8)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text \(line 2"):
        prepare_data(config(path, tmp_path), tok, seq_len=8)


@pytest.mark.parametrize(
    "field,value",
    [("eval_fraction", 1.5), ("eval_docs", -1), ("format", "csv"), ("sample_by", "word"), ("num_proc", 0),
     ("retrieval_share", 1.5), ("retrieval_kind", "needles"), ("retrieval_max_spans", 0)],
)
def test_config_errors_name_field_and_value(field, value):
    with pytest.raises(RecipeError, match=f"data.{field}={value!r} is invalid"):
        DataConfig(path="x", tokenizer="y", **{field: value})


def test_too_little_data_for_a_batch(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(seed=9, n=3, max_words=5))
    with pytest.raises(DataError, match="less than one block"):
        prepare_data(config(path, tmp_path), tok, seq_len=4096)
    data = prepare_data(config(path, tmp_path), tok, seq_len=8)
    with pytest.raises(DataError, match="fewer than batch_size"):
        build_train_loader(data, batch_size=len(data.train) + 1)
    with pytest.raises(DataError, match="no held-out blocks"):
        build_eval_loader(data, batch_size=1)
    with pytest.raises(DataError, match="leaving none to train on"):
        prepare_data(config(path, tmp_path, eval_docs=3), tok, seq_len=8)
