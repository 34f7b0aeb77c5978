"""Context-parallel attention (ring, allgather, ulysses) against one process on the full sequence.

Distributed tests spawn one group of processes per world size (gloo over loopback, the Triton
interpreter, small shapes), run every case with every method inside it, and send each rank's
shard back to the test process, which lays the shards out in position order and compares them
with the single-process kernel and a float64 reference. Tolerance is the house rule
(``numerics.assert_no_worse_than_torch``): the context-parallel error against fp64 is at most
about twice the single-process kernel's. The plan of kernel calls (`schedule`) is checked on its
own, pair by pair against a brute-force mask, for many more configurations than the kernel runs.
"""

import bisect
import functools
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import CPU_PROCESSES
from numerics import assert_no_worse_than_torch, magnitude, max_error
from flashlm.kernels.attention import (attention_reference, flash_attn_func,
                                       flash_attn_varlen_func, varlen_attention_reference)
from flashlm.parallel import (context_parallel_attention, shard_sequence,
                              simulate_context_parallel, unshard_sequence)
from flashlm.parallel import schedule as sch
from flashlm.parallel.collectives import ALL_GATHER, REDUCE_SCATTER
from flashlm.parallel.context_parallel import IMPLS
from flashlm.parallel.simulate import communication_bytes
from flashlm.parallel.zigzag import (Layout, document_layout, layout_work, shard_of, to_positions,
                                     zigzag_layout)

pytestmark = CPU_PROCESSES

SPAWN_TIMEOUT_S = 600
ULPS = {torch.float16: 4, torch.float32: 32}  # as test_attention: exp2 vs exp rounding in fp32
NAMES = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Case:
    """One attention problem; the full length is ``2 * world * chunk`` unless ``seqlen`` is set.
    ``doc_lengths`` are repeated to pack the sequence with documents (None: no documents). The
    loss is ``sum(out * dout)``, plus ``sum(lse * dlse)`` when ``lse_grad``."""

    name: str
    nheads: int = 4
    nheads_k: int = 2
    head_dim: int = 64
    causal: bool = True
    window: tuple = (-1, -1)
    doc_lengths: tuple | None = None
    batch: int = 1
    chunk: int = 12
    seqlen: int | None = None
    dtype: str = "float32"
    impls: tuple = IMPLS
    lse_grad: bool = False
    seed: int = 0
    balance: str = "zigzag"

    def length(self, world):
        return self.seqlen if self.seqlen is not None else 2 * world * self.chunk

    def layout(self, world):
        """The shards' layout: the zigzag, or `document_layout` of the case's documents."""
        if self.balance == "zigzag":
            return zigzag_layout(world)
        return document_layout(self.length(world), world, self.cu_seqlens(world))

    def cu_seqlens(self, world):
        if self.doc_lengths is None:
            return None
        total, cu, i = self.length(world), [0], 0
        while cu[-1] < total:
            cu.append(min(cu[-1] + self.doc_lengths[i % len(self.doc_lengths)], total))
            i += 1
        return torch.tensor(cu, dtype=torch.int32)

    def inputs(self, world):
        gen = torch.Generator().manual_seed(self.seed)
        dtype = getattr(torch, self.dtype)
        s = self.length(world)
        shapes = [(self.batch, s, self.nheads, self.head_dim)] + \
            [(self.batch, s, self.nheads_k, self.head_dim)] * 2 + \
            [(self.batch, s, self.nheads, self.head_dim)]
        q, k, v, dout = [torch.randn(*shape, generator=gen).to(dtype) for shape in shapes]
        dlse = torch.randn(self.batch, self.nheads, s, generator=gen) if self.lse_grad else None
        return q, k, v, dout, dlse


# Every method at N = 2, and most cases at N = 4 (FOUR_RANKS below): causal and full, GQA and
# MQA, head dims 64 and 128, documents that cross chunk and rank boundaries (chunks of 12 tokens;
# lengths 7, 29, 1, 18, ...), sliding windows on either side, a batch of 2.
CASES = [
    Case(name="causal-mha-d64", nheads_k=4),
    Case(name="full-gqa-d128", causal=False, head_dim=128),
    Case(name="causal-gqa-docs-d64", doc_lengths=(7, 29, 1, 18)),
    Case(name="causal-window-mqa-d64", nheads_k=1, window=(9, -1)),
    Case(name="full-window-docs-d128", causal=False, head_dim=128, window=(5, 3),
         doc_lengths=(30, 5, 14), lse_grad=True),
    Case(name="causal-window-docs-gqa-d64", window=(17, 0), doc_lengths=(40, 3, 11)),
    Case(name="causal-batch2-gqa-d64", batch=2, seed=1),
]
# Documents ending exactly at chunk boundaries: every rank's work is local, the ring sends
# nothing.
LOCAL_DOCS = Case(name="causal-chunk-aligned-docs", doc_lengths=(12,), impls=("ring",))
# Same data at every world size for the drift test: S = 64 splits into 2N chunks up to N = 4;
# at N = 4 Ulysses replicates its 2 K/V heads, so its fp32 sum of dK/dV replicas is exercised.
DRIFT = [Case(name=f"drift-{dtype}", nheads=4, nheads_k=2, seqlen=64, dtype=dtype,
              doc_lengths=(25, 5, 34), seed=2) for dtype in ("float32", "float16")]
# Ring and allgather on the layout that balances packed documents (`document_layout`): chunks of
# 4 or 8 per rank, in an order that is not the zigzag's; causal, a window, and full attention.
BALANCED = [
    Case(name="balanced-causal-docs", chunk=16, doc_lengths=(3, 5, 40, 2, 7), balance="documents",
         impls=("ring", "allgather")),
    Case(name="balanced-window-docs", chunk=16, window=(9, 0), doc_lengths=(29, 2, 4, 6), balance="documents",
         impls=("ring", "allgather"), lse_grad=True),
    Case(name="balanced-full-docs-d128", chunk=16, causal=False, head_dim=128, doc_lengths=(1, 6, 33, 3),
         balance="documents", impls=("ring", "allgather"), seed=3),
]
# Four ranks (ring steps that neither start nor end the ring, documents over three shards) run a
# subset, to keep the suite's time: the cases with documents (causal, and with a window) and the
# first two balanced layouts; the others run at two ranks only.
FOUR_RANKS = [c for c in CASES if c.name in ("causal-gqa-docs-d64", "causal-window-docs-gqa-d64")]
WORLD_CASES = {1: DRIFT, 2: CASES + [LOCAL_DOCS] + DRIFT + BALANCED, 4: FOUR_RANKS + [LOCAL_DOCS] + DRIFT + BALANCED[:2]}


def at_world_sizes(cases, worlds=(2, 4)):
    """(world, case) pairs for parametrize: each case at each world size whose spawn runs it."""
    return [pytest.param(w, c, id=f"{w}-{c.name}") for w in worlds for c in cases if c in WORLD_CASES[w]]


def _bad_calls(world):
    """Configurations every rank must refuse before communicating: (name, kwargs)."""
    def qkv(rows, nheads, nheads_k):
        return (torch.zeros(1, rows, nheads, 64), torch.zeros(1, rows, nheads_k, 64),
                torch.zeros(1, rows, nheads_k, 64))
    return [
        ("odd-local-length", dict(qkv=qkv(7, 4, 2), impl="ring")),
        ("ulysses-heads", dict(qkv=qkv(8, world + 1, 1), impl="ulysses")),
        ("ulysses-heads-k", dict(qkv=qkv(8, 3 * world, 3), impl="ulysses")),
        ("unknown-impl", dict(qkv=qkv(8, 4, 2), impl="rings")),
        ("cu-seqlens-end", dict(qkv=qkv(8, 4, 2), impl="allgather",
                                cu_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32))),
        ("head-chunks", dict(qkv=qkv(8, 4, 2), impl="allgather", head_chunks=3)),
    ]


# ------------------------------------------------------------------ the spawned workers

class _CountBytes:
    """Counts the bytes this rank sends through torch.distributed while active, with the
    conventions of `communication_bytes`: P2P sends in full, an all-gather (N - 1) times its
    input, a reduce-scatter or all-to-all (N - 1) / N of its input."""

    FUNCTIONS = ("batch_isend_irecv", ALL_GATHER, REDUCE_SCATTER,
                 "all_to_all_single")

    def __init__(self, world):
        self.world, self.sent, self.saved = world, 0, {}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if name == "batch_isend_irecv":
                self.sent += sum(op.tensor.nbytes for op in args[0] if op.op is dist.isend)
            elif name == ALL_GATHER:
                self.sent += args[1].nbytes * (self.world - 1)
            else:
                self.sent += args[1].nbytes * (self.world - 1) / self.world
            return fn(*args, **kwargs)
        return counted

    def __enter__(self):
        for name in self.FUNCTIONS:
            self.saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self.saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        return False


def _runs(case, impl, world):
    return impl != "ulysses" or case.nheads % world == 0


def _run_case(case, impl, group, world):
    q, k, v, dout, dlse = case.inputs(world)
    layout = case.layout(world)
    local = [shard_sequence(t, group, layout=layout).requires_grad_() for t in (q, k, v)]
    with _CountBytes(world) as fwd:
        out, lse = context_parallel_attention(
            *local, group, impl=impl, causal=case.causal, window_size=case.window,
            cu_seqlens=case.cu_seqlens(world), return_lse=True, layout=layout)
    loss = (out.float() * shard_sequence(dout, group, layout=layout).float()).sum()
    if dlse is not None:
        loss = loss + (lse * shard_sequence(dlse, group, dim=2, layout=layout)).sum()
    with _CountBytes(world) as bwd:
        loss.backward()
    gathered = unshard_sequence(out.detach(), group, layout=layout)
    return dict(out=out.detach(), lse=lse.detach(), dq=local[0].grad, dk=local[1].grad,
                dv=local[2].grad, bytes=(fwd.sent, bwd.sent), unsharded=gathered)


def _worker(rank, world, store, cases, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # this process only: keep gloo on loopback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=SPAWN_TIMEOUT_S))
    try:
        group = dist.group.WORLD
        results = {(case.name, impl): _run_case(case, impl, group, world)
                   for case in cases for impl in case.impls if _runs(case, impl, world)}
        errors = {}
        if world > 1:
            for name, kwargs in _bad_calls(world):
                q, k, v = kwargs.pop("qkv")
                try:
                    context_parallel_attention(q, k, v, group, **kwargs)
                    errors[name] = None
                except (ValueError, TypeError) as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
        x = torch.randn(2, 4 * world, 3, generator=torch.Generator().manual_seed(3))
        x_local = shard_sequence(x, group).requires_grad_()
        full = unshard_sequence(x_local, group)
        (full * x).sum().backward()  # d/dx_local = this rank's shard of x
        unshard_ok = torch.equal(full, x) and torch.equal(x_local.grad, shard_sequence(x, group))
        torch.save({"results": results, "errors": errors, "unshard_ok": unshard_ok},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world, cases, tmp_dir):
    """Run the cases on ``world`` spawned ranks; per rank, what `_worker` saved."""
    store = os.path.join(tmp_dir, "store")
    ctx = mp.start_processes(_worker, args=(world, store, cases, tmp_dir), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"context-parallel workers (world {world}) did not finish in "
                                   f"{SPAWN_TIMEOUT_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
            proc.join()
    return [torch.load(os.path.join(tmp_dir, f"{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(world)``: every rank's results for ``WORLD_CASES[world]``, spawned once."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _spawn(world, WORLD_CASES[world],
                                  str(tmp_path_factory.mktemp(f"cp{world}")))
        return cache[world]
    return get


def _full(per_rank, key, layout, dim):
    """A result key of every rank laid out in position order along ``dim``."""
    return to_positions(torch.cat([r[key] for r in per_rank], dim=dim), layout, dim=dim)


def _cp_result(ranks, case, impl, world):
    per_rank = [r["results"][(case.name, impl)] for r in ranks]
    got = [_full(per_rank, name, case.layout(world), 2 if name == "lse" else 1) for name in NAMES]
    return got, per_rank


# ------------------------------------------------------------------- references, in-process

@functools.lru_cache(maxsize=None)
def _single_process(case, world, dtype=None):
    """(out, lse, dq, dk, dv) of the kernel on the full sequence, or of the pure-PyTorch
    reference in ``dtype`` (float64) when given."""
    q, k, v, dout, dlse = case.inputs(world)
    cu = case.cu_seqlens(world)
    if dtype is not None:
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if cu is None:
        fn = attention_reference if dtype is not None else \
            lambda *a, **kw: flash_attn_func(*a, return_lse=True, **kw)
        out, lse = fn(*leaves, causal=case.causal, window_size=case.window)
    else:
        longest = int((cu[1:] - cu[:-1]).max())
        packed = [t[0] for t in leaves]
        if dtype is not None:
            out, lse = varlen_attention_reference(*packed, cu, cu, causal=case.causal,
                                                  window_size=case.window)
        else:
            out, lse = flash_attn_varlen_func(*packed, cu, cu, longest, longest,
                                              causal=case.causal, window_size=case.window,
                                              return_lse=True)
        out, lse = out[None], lse[None]
    if dlse is None:
        grads = torch.autograd.grad(out, leaves, dout)
    else:
        grads = torch.autograd.grad([out, lse], leaves, [dout, dlse.to(lse.dtype)])
    return [out.detach(), lse.detach(), *grads]


def _check(case, got, world):
    dtype = getattr(torch, case.dtype)
    ref64 = _single_process(case, world, torch.float64)
    low = _single_process(case, world)
    grad_scale = max(magnitude(r) for r in ref64[2:])
    for name, g, r, lo in zip(NAMES, got, ref64, low):
        assert_no_worse_than_torch(f"{case.name} {name}", g, r, lo, dtype, ulps=ULPS[dtype],
                                   scale=grad_scale if name.startswith("d") else None)


# ------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world, case", at_world_sizes(CASES))
def test_matches_single_process(runs, world, case, impl):
    got, per_rank = _cp_result(runs(world), case, impl, world)
    _check(case, got, world)
    for r in per_rank:  # unshard_sequence gives every rank the full output
        assert torch.equal(r["unsharded"], got[0])


@pytest.mark.parametrize("impl", ["ring", "allgather"])
@pytest.mark.parametrize("world, case", at_world_sizes(BALANCED))
def test_document_layout_matches_single_process(runs, world, case, impl):
    """Shards cut by `document_layout` (not the zigzag's chunks): the same results as one
    process; `unshard_sequence` with the layout restores the position order."""
    layout = case.layout(world)
    assert layout != zigzag_layout(world) and layout.nchunks > 2 * world
    got, per_rank = _cp_result(runs(world), case, impl, world)
    _check(case, got, world)
    for r in per_rank:
        assert torch.equal(r["unsharded"], got[0])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_unshard_inverts_shard_and_differentiates(runs, world):
    assert all(r["unshard_ok"] for r in runs(world))


@pytest.mark.parametrize("world", [2, 4])
def test_chunk_aligned_documents_stay_local(runs, world):
    """Documents that end at chunk boundaries: the ring has no step but the first and sends
    no byte, and the result is still exact."""
    got, per_rank = _cp_result(runs(world), LOCAL_DOCS, "ring", world)
    _check(LOCAL_DOCS, got, world)
    assert all(r["bytes"] == (0, 0) for r in per_rank)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world, case", at_world_sizes(CASES[:1] + CASES[3:4] + CASES[6:7]))
def test_bytes_sent_match_the_formula(runs, world, case, impl):
    """What each rank really sent (counted at the torch.distributed calls) is what
    `communication_bytes` says, forward and backward."""
    _, per_rank = _cp_result(runs(world), case, impl, world)
    seqlen = case.length(world)
    hops = len(sch.ring_schedule(world, seqlen, sch.documents(None, seqlen),
                                 *sch.band(case.causal, case.window))[0]) - 1
    want = communication_bytes(impl, world, case.batch, seqlen, case.nheads, case.nheads_k,
                               case.head_dim, getattr(torch, case.dtype).itemsize,
                               ring_hops=hops)
    for r in per_rank:
        assert r["bytes"] == pytest.approx((want["forward"], want["backward"]), abs=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DRIFT, ids=lambda c: c.name)
def test_error_does_not_grow_with_world_size(runs, case, impl):
    """The same problem at N = 1, 2, 4: the error against fp64 stays within twice the N = 1
    error (partial results merge in fp32), and each N passes the house rule."""
    ref64 = _single_process(case, 1, torch.float64)
    errors = {}
    for world in (w for w in (1, 2, 4) if _runs(case, impl, w)):
        got, _ = _cp_result(runs(world), case, impl, world)
        _check(case, got, world)
        errors[world] = [max_error(g, r) for g, r in zip(got, ref64)]
    for world in sorted(errors)[1:]:
        for name, err, base in zip(NAMES, errors[world], errors[1]):
            assert err <= 2 * base, (
                f"{impl} {name}: error {err:.2e} at N={world} against {base:.2e} at N=1")


@pytest.mark.parametrize("world", [2, 4])
def test_bad_configurations_fail_clearly(runs, world):
    errors = runs(world)[0]["errors"]
    assert all(r["errors"] == errors for r in runs(world))  # every rank refuses alike
    expect = {
        "odd-local-length": f"is not divisible by 2 * world_size = {2 * world}",
        "ulysses-heads": f"must be divisible by world_size={world}",
        "ulysses-heads-k": "heads_k=3 to divide or be divisible by world_size",
        "unknown-impl": "impl='rings' is not one of",
        "cu-seqlens-end": f"end at the full sequence length {8 * world}",
        "head-chunks": "head_chunks=3 must be >= 1 and divide heads_k=2",
    }
    for name, phrase in expect.items():
        assert errors[name] is not None and errors[name].startswith("ValueError"), errors[name]
        assert phrase in errors[name], errors[name]


def test_shard_sequence_needs_2n_chunks():
    with pytest.raises(ValueError, match="sequence length 20 is not divisible by 2 \\* "
                                         "world_size = 8"):
        shard_of(torch.zeros(1, 20), 0, 4)


def test_zigzag_shards_round_trip():
    x = torch.arange(2 * 24).reshape(2, 24)
    shards = [shard_of(x, r, 3) for r in range(3)]
    assert shards[0][0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]  # chunks 0 and 5
    assert torch.equal(to_positions(torch.cat(shards, dim=1), 3, dim=1), x)


# ------------------------------------------------------------------- the plan, exhaustively

def _visible(p, s, docs, lo, hi):
    same_doc = bisect.bisect_right(docs, p) == bisect.bisect_right(docs, s)
    return same_doc and (lo is None or s - p >= lo) and (hi is None or s - p <= hi)


def _positions(pieces):
    return [p.pos + i for p in pieces for i in range(p.length)]


def _plan_configs():
    rng = random.Random(0)
    for world in (1, 2, 3, 4, 8):
        for chunk in (3, 5):
            seqlen = 2 * world * chunk
            for ndocs in range(6):
                cuts = sorted(rng.sample(range(1, seqlen), k=min(seqlen - 1, ndocs)))
                docs = tuple([0] + cuts + [seqlen])
                if ndocs == 5:
                    docs = (0, 0) + docs[1:-1] + (seqlen, seqlen)  # empty documents
                for causal in (True, False):
                    for window in ((-1, -1), (2, -1), (0, 3), (4, 1), (-1, 2), (0, 0), (7, 7)):
                        yield world, seqlen, docs, causal, window


def _check_plans(layout, seqlen, docs, causal, window):
    """The ring's calls (over all steps) and the all-gather's calls of every rank visit each
    (query, key) pair the full mask allows exactly once and nothing else."""
    lo, hi = sch.band(causal, window)
    ring = sch.ring_schedule(layout, seqlen, docs, lo, hi)
    gather = sch.allgather_schedule(layout, seqlen, docs, lo, hi)
    world = layout.world_size if isinstance(layout, Layout) else layout
    for rank in range(world):
        qpos = _positions(sch.zigzag_pieces(rank, layout, seqlen))
        want = {(p, s) for p in qpos for s in range(seqlen) if _visible(p, s, docs, lo, hi)}
        got = []
        for step, blocks in enumerate(ring[rank]):
            kpos = _positions(sch.zigzag_pieces((rank - step) % world, layout, seqlen))
            for blk in blocks:
                assert min(blk.window) >= -1
                got += [(qpos[i], kpos[j]) for i, j in blk.pairs()]
        assert len(got) == len(set(got)) and set(got) == want, (layout, docs, causal, window)
        got = [(qpos[i], j) for blk in gather[rank] for i, j in blk.pairs()]
        assert len(got) == len(set(got)) and set(got) == want, (layout, docs, causal, window)
        rows = [i for blk in gather[rank] for i in range(blk.q0, blk.q1)]
        assert len(rows) == len(set(rows))


def test_plans_cover_each_visible_pair_exactly_once():
    """For every rank, the ring's and the all-gather's calls visit each visible pair exactly
    once; windows are what the kernel accepts; the all-gather computes each query row in one
    call; the unsplit problem's one call covers the mask."""
    count = 0
    for world, seqlen, docs, causal, window in _plan_configs():
        _check_plans(world, seqlen, docs, causal, window)
        lo, hi = sch.band(causal, window)
        whole = sch.whole_sequence_block(seqlen, docs, causal, window)
        assert set(whole.pairs()) == {(p, s) for p in range(seqlen) for s in range(seqlen)
                                      if _visible(p, s, docs, lo, hi)}
        count += 1
    assert count == 840


def test_document_layout_plans_cover_each_visible_pair_exactly_once():
    """The same on layouts `document_layout` makes: 4 to 16 chunks per rank in any order."""
    rng = random.Random(1)
    layouts = set()
    for world in (2, 3, 4):
        seqlen = 16 * world * 2
        for ndocs in (3, 6, 12):
            docs = tuple([0] + sorted(rng.sample(range(1, seqlen), k=ndocs)) + [seqlen])
            layout = document_layout(seqlen, world, docs)
            layouts.add(layout.nchunks // world)
            for causal in (True, False):
                for window in ((-1, -1), (5, -1), (3, 2)):
                    _check_plans(layout, seqlen, docs, causal, window)
    assert layouts - {2}, layouts  # finer cuts than the zigzag's were planned


def test_document_layout_balances_packed_documents():
    """Short packed documents: the zigzag leaves ranks with a third of the busiest one's causal
    work; `document_layout` brings every rank within 5% of it. Each chunk is held once, every
    rank holds as many, in position order. One document keeps the zigzag."""
    rng = random.Random(0)
    for seqlen, world, mean in ((4096, 8, 128), (4096, 8, 256), (1024, 4, 64)):
        cuts = [0]
        while cuts[-1] < seqlen:
            cuts.append(min(seqlen, cuts[-1] + max(1, int(rng.expovariate(1 / mean)))))
        docs = tuple(cuts)
        layout = document_layout(seqlen, world, docs)
        held = sorted(c for chunks in layout.chunks for c in chunks)
        assert held == list(range(layout.nchunks))
        assert len({len(c) for c in layout.chunks}) == 1 and all(list(c) == sorted(c) for c in layout.chunks)
        zig, balanced = layout_work(world, seqlen, docs), layout_work(layout, seqlen, docs)
        assert sum(zig) == sum(balanced) == sum((b - a) * (b - a + 1) // 2 for a, b in zip(docs, docs[1:]))
        assert min(zig) / max(zig) < 0.5 and min(balanced) / max(balanced) >= 0.95, (zig, balanced)
    assert document_layout(64, 4, (0, 64)) == zigzag_layout(4)
    with pytest.raises(ValueError, match="not divisible by 2 \\* world_size = 8"):
        document_layout(20, 4, (0, 5, 20))
    with pytest.raises(ValueError, match="end at the sequence length 64, got \\[0, 5, 60\\]"):
        document_layout(64, 4, torch.tensor([0, 5, 60]))
    assert document_layout(64, 4, torch.tensor([0, 5, 64])) == document_layout(64, 4, [0, 5, 64])


def test_ring_plan_skips_what_the_mask_empties():
    """Causal: every step is one call per rank (the zigzag balance). A window shorter than a
    chunk leaves the middle steps without calls; documents within chunks end the ring at step
    0."""
    world, seqlen = 4, 256
    causal = sch.ring_schedule(world, seqlen, (0, seqlen), None, 0)
    assert [[len(b) for b in steps] for steps in causal] == [[1] * world] * world
    window = sch.ring_schedule(world, seqlen, (0, seqlen), -16, 0)
    assert all(steps[2] == () for steps in window)
    assert [len(steps[1]) for steps in window] == [0, 1, 1, 1]  # rank 0's first chunk is first
    local = sch.ring_schedule(world, seqlen, tuple(range(0, seqlen + 1, 32)), None, 0)
    assert all(len(steps) == 1 for steps in local)


def test_causal_work_is_balanced():
    """Under the zigzag layout every rank's ring and all-gather calls cover the same number of
    (query, key) pairs under a causal mask."""
    world, seqlen = 4, 64
    ring = sch.ring_schedule(world, seqlen, (0, seqlen), None, 0)
    gather = sch.allgather_schedule(world, seqlen, (0, seqlen), None, 0)
    ring_work = [sum(len(list(b.pairs())) for steps in rank_steps for b in steps)
                 for rank_steps in ring]
    gather_work = [sum(len(list(b.pairs())) for b in blocks) for blocks in gather]
    assert len(set(ring_work)) == 1 and ring_work == gather_work
    assert ring_work[0] * world == seqlen * (seqlen + 1) // 2


# ------------------------------------------------------------------------- the simulation

@pytest.mark.parametrize("impl", IMPLS)
def test_simulation_bookkeeping(impl):
    """The simulated ranks' results, laid back in order, are the full attention (so each rank
    ran exactly its share); calls and bytes are those of the plan and the formula. Timings are
    only checked to exist."""
    case = Case(name="sim", nheads=4, nheads_k=2, window=(20, -1), doc_lengths=(23, 41))
    world = 4
    q, k, v, dout, _ = case.inputs(world)
    sim = simulate_context_parallel(q, k, v, world, impl, causal=case.causal,
                                    window_size=case.window, cu_seqlens=case.cu_seqlens(world),
                                    dout=dout, warmup=0, repeats=1)
    _check(case, [sim.out, sim.lse, sim.dq, sim.dk, sim.dv], world)
    assert len(sim.forward_s) == len(sim.backward_s) == world
    assert all(t > 0 for t in sim.forward_s + sim.backward_s)
    seqlen, docs = case.length(world), sch.documents(case.cu_seqlens(world).tolist(), 96)
    plan_args = (world, seqlen, docs, *sch.band(case.causal, case.window))
    hops = len(sch.ring_schedule(*plan_args)[0]) - 1
    if impl == "ring":
        assert sim.calls == [sum(map(len, steps)) for steps in sch.ring_schedule(*plan_args)]
    elif impl == "allgather":
        assert sim.calls == [len(b) for b in sch.allgather_schedule(*plan_args)]
    else:
        assert sim.calls == [1] * world
    assert sim.bytes == communication_bytes(impl, world, 1, seqlen, 4, 2, 64, 4, ring_hops=hops)


@pytest.mark.parametrize("impl", ["ring", "allgather"])
def test_simulation_on_a_document_layout(impl):
    """The simulation on `document_layout`'s shards: the full attention, laid back in order."""
    case = BALANCED[0]
    world = 4
    q, k, v, dout, _ = case.inputs(world)
    layout = case.layout(world)
    sim = simulate_context_parallel(q, k, v, world, impl, cu_seqlens=case.cu_seqlens(world), dout=dout,
                                    warmup=0, repeats=1, layout=layout)
    _check(case, [sim.out, sim.lse, sim.dq, sim.dk, sim.dv], world)
    with pytest.raises(ValueError, match="ulysses.*zigzag layout only"):
        simulate_context_parallel(q, k, v, world, "ulysses", layout=layout)


def test_communication_formulas():
    """Hand-computed bytes for one layer: B=1, S=1024, N=4 (L=256), H=8, H_k=2, D=64, bf16."""
    kv = 2 * 256 * 2 * 64  # K and V elements of one rank
    assert communication_bytes("ring", 4, 1, 1024, 8, 2, 64, 2) == {
        "forward": 3 * kv * 2, "backward": 3 * kv * 2 + 4 * kv * 4}
    assert communication_bytes("allgather", 4, 1, 1024, 8, 2, 64, 2) == {
        "forward": 3 * kv * 2, "backward": 3 * kv * 2 + 3 * kv * 4}
    q = 256 * 8 * 64 * 2
    replicated_kv = 2 * 256 * 4 * 64  # one K/V head for each of the 4 ranks
    assert communication_bytes("ulysses", 4, 1, 1024, 8, 2, 64, 2) == {
        "forward": 3 / 4 * (2 * q + replicated_kv * 2 + 256 * 8 * 4),
        "backward": 3 / 4 * (2 * q + replicated_kv * 4)}
    assert communication_bytes("ring", 4, 1, 1024, 8, 2, 64, 2, ring_hops=0) == {
        "forward": 0, "backward": 0}


def test_simulation_refuses_bad_configurations():
    q, k = torch.zeros(1, 24, 6, 64), torch.zeros(1, 24, 3, 64)
    with pytest.raises(ValueError, match="divisible by 2 \\* world_size = 16"):
        simulate_context_parallel(q, k, k, 8, "ring")
    with pytest.raises(ValueError, match="heads=6 must be divisible by world_size=4"):
        simulate_context_parallel(q, k, k, 4, "ulysses")
