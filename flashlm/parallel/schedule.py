"""Which kernel calls make up one rank's share of context-parallel attention.

Plain Python on integers, no tensors: the methods (`ring`, `allgather`, `ulysses`) and the
simulation (`simulate`) run what these functions plan, and the tests check the plans directly.

Masks as a band
    Within one document the mask of the full problem (``seqlen_q == seqlen_k``, so the kernel's
    bottom-right alignment is the plain diagonal) is a band on positions: query ``p`` sees key
    ``s`` iff ``lo <= s - p <= hi``, with ``hi = 0`` when causal, ``hi = right`` and
    ``lo = -left`` for a sliding window, ``None`` for an unbounded side. Packed documents only
    add ``s`` and ``p`` in the same document.

One kernel call per rectangle
    A query range ``[qs, qe)`` and a key range ``[ks, ke)`` of positions (one document, or no
    documents) first lose the rows that see no key and the keys no row sees (`_rectangle`); an
    empty rectangle is never computed. The kernel aligns its mask bottom-right: with
    ``d = (ke - ks) - (qe - qs)`` it lets local row ``i`` see local key ``j`` iff
    ``d - left' <= j - i <= d + right'``. Writing ``e = ke - qe`` (how far the keys reach past
    the last query) the band is reproduced exactly by ``right' = hi - e`` and
    ``left' = e - lo``, whatever ``ks`` is; a side of the band that does not cut into the
    rectangle gets -1 (no mask arithmetic at all). After the trimming both values are >= 0, which the kernel
    requires. Because only ``e`` matters, documents whose rectangles share one ``e`` go into one
    varlen call (separate ``cu_seqlens_q``/``cu_seqlens_k``); when the left side of the window
    binds, the key range can start anywhere before the window (the kernel never visits tiles left
    of it), so it starts at the document, which keeps the documents' key ranges adjacent.

Calls are `Block`s in buffer rows: query rows of the rank's local queries, key rows of the key
buffer the call reads (a ring step's neighbour block, or the all-gathered sequence).
"""

import bisect
import functools
from dataclasses import dataclass

from flashlm.parallel.zigzag import as_layout


@dataclass(frozen=True)
class Block:
    """One kernel call: query rows ``[q0, q1)`` against key rows ``[k0, k1)``.

    ``window`` is the kernel's ``(left, right)`` in its bottom-right alignment within the block
    (-1 unbounded; never causal=True). ``cu_q``/``cu_k``, when set, make it a varlen call over
    packed segments (offsets relative to ``q0``/``k0``)."""

    q0: int
    q1: int
    k0: int
    k1: int
    window: tuple[int, int] = (-1, -1)
    cu_q: tuple[int, ...] | None = None
    cu_k: tuple[int, ...] | None = None

    @property
    def unmasked(self):
        return self.window == (-1, -1) and self.cu_q is None

    @property
    def max_q(self):
        return _longest(self.cu_q) if self.cu_q else self.q1 - self.q0

    @property
    def max_k(self):
        return _longest(self.cu_k) if self.cu_k else self.k1 - self.k0

    def pairs(self):
        """Visible (query row, key row) pairs of this block, as the kernel would compute them
        (for tests and bookkeeping; quadratic)."""
        cu_q = self.cu_q or (0, self.q1 - self.q0)
        cu_k = self.cu_k or (0, self.k1 - self.k0)
        left, right = self.window
        for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
            diag = (d - c) - (b - a)
            for i in range(b - a):
                for j in range(d - c):
                    if (right < 0 or j <= i + diag + right) and (left < 0 or j >= i + diag - left):
                        yield self.q0 + a + i, self.k0 + c + j


def _longest(cu):
    return max(b - a for a, b in zip(cu, cu[1:]))


@dataclass(frozen=True)
class Piece:
    """A contiguous run of ``length`` positions starting at position ``pos``, held at rows
    ``[row, row + length)`` of a buffer."""

    pos: int
    length: int
    row: int


def band(causal, window_size):
    """The mask as ``(lo, hi)`` on ``key - query`` positions (``None``: unbounded)."""
    left, right = window_size
    lo = -left if left >= 0 else None
    hi = 0 if causal else (right if right >= 0 else None)
    return lo, hi


def documents(cu_seqlens, seqlen):
    """Document boundaries as a tuple of offsets (one document when ``cu_seqlens`` is None)."""
    return (0, seqlen) if cu_seqlens is None else tuple(int(c) for c in cu_seqlens)


def zigzag_pieces(rank, world_size, seqlen):
    """The chunks a rank holds (under ``world_size``'s layout: a `zigzag.Layout`, or a world
    size for the zigzag), as pieces of its local buffer."""
    layout = as_layout(world_size)
    chunk = seqlen // layout.nchunks
    return tuple(Piece(c * chunk, chunk, i * chunk) for i, c in enumerate(layout.chunks[rank]))


def _rectangle(qs, qe, ks, ke, lo, hi):
    """The visible part of queries ``[qs, qe)`` x keys ``[ks, ke)`` under the band, as
    ``(qs, qe, ks, ke, (left, right))`` with the kernel's window, or None when nothing is
    visible."""
    if hi is not None:
        qs = max(qs, ks - hi)        # rows before ks - hi see no key
    if lo is not None:
        qe = min(qe, ke - lo)        # rows from ke - lo on see no key
    if qs >= qe:
        return None
    if hi is not None:
        ke = min(ke, qe + hi)        # the last row sees up to qe - 1 + hi
    first = ks if lo is None else max(ks, qs + lo)  # the first row sees from qs + lo
    if first >= ke:
        return None
    reach = ke - qe
    right = -1 if hi is None or qs + hi >= ke - 1 else hi - reach
    left = -1 if lo is None or qe - 1 + lo <= first else reach - lo
    return qs, qe, (ks if left >= 0 else first), ke, (left, right)


def _pair_blocks(qp, kp, docs, lo, hi):
    """Kernel calls for the query piece ``qp`` against the key piece ``kp``: one rectangle per
    document they share; consecutive rectangles with the same window and adjacent rows go into
    one varlen call."""
    q_end, k_end = qp.pos + qp.length, kp.pos + kp.length
    segments = []
    first_doc = max(bisect.bisect_right(docs, max(qp.pos, kp.pos)) - 1, 0)
    for d0, d1 in zip(docs[first_doc:], docs[first_doc + 1:]):
        if d0 >= min(q_end, k_end):
            break
        rect = _rectangle(max(d0, qp.pos), min(d1, q_end), max(d0, kp.pos), min(d1, k_end), lo, hi)
        if rect is not None:
            qs, qe, ks, ke, window = rect
            segments.append((qs - qp.pos + qp.row, qe - qp.pos + qp.row,
                             ks - kp.pos + kp.row, ke - kp.pos + kp.row, window))
    groups = []
    for seg in segments:
        prev = groups[-1][-1] if groups else None
        if prev is not None and prev[4] == seg[4] and prev[1] == seg[0] and prev[3] == seg[2]:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    return [_group_block(g) for g in groups]


def _group_block(segments):
    (q0, _, k0, _, window), (_, q1, _, k1, _) = segments[0], segments[-1]
    if len(segments) == 1:
        return Block(q0, q1, k0, k1, window)
    cu_q = (0,) + tuple(s[1] - q0 for s in segments)
    cu_k = (0,) + tuple(s[3] - k0 for s in segments)
    return Block(q0, q1, k0, k1, window, cu_q, cu_k)


def _coalesce(blocks):
    """Join unmasked dense calls that tile a larger rectangle (same query rows and adjacent key
    rows, then the converse): fewer, larger launches."""
    for same, near in (((0, 1), (2, 3)), ((2, 3), (0, 1))):
        blocks = sorted(blocks, key=lambda b: (b.q0, b.k0) if same == (0, 1) else (b.k0, b.q0))
        out = []
        for blk in blocks:
            prev = out[-1] if out else None
            if (prev is not None and prev.unmasked and blk.unmasked
                    and _span(prev, same) == _span(blk, same)
                    and _span(prev, near)[1] == _span(blk, near)[0]):
                lo_hi = (_span(prev, near)[0], _span(blk, near)[1])
                out[-1] = (Block(prev.q0, prev.q1, *lo_hi) if same == (0, 1)
                           else Block(*lo_hi, prev.k0, prev.k1))
            else:
                out.append(blk)
        blocks = out
    return sorted(blocks, key=lambda b: (b.q0, b.k0))


def _span(blk, which):
    return (blk.q0, blk.q1) if which == (0, 1) else (blk.k0, blk.k1)


def plan_blocks(q_pieces, k_pieces, docs, lo, hi):
    """Kernel calls computing queries ``q_pieces`` against keys ``k_pieces`` under the band
    ``(lo, hi)`` and the documents ``docs`` (boundary offsets)."""
    blocks = [b for qp in q_pieces for kp in k_pieces for b in _pair_blocks(qp, kp, docs, lo, hi)]
    return tuple(_coalesce(blocks))


def _own_block_causal(pieces, docs):
    """A rank's queries against its own keys under a causal (or no) mask and no left window: one
    call over the local rows. The local order of the two chunks is the position order, and a
    causal mask only compares order, so the gap between the chunks changes nothing; a document
    that spans the gap is one packed segment."""
    segments = []
    for p in pieces:
        first_doc = max(bisect.bisect_right(docs, p.pos) - 1, 0)
        for d0, d1 in zip(docs[first_doc:], docs[first_doc + 1:]):
            if d0 >= p.pos + p.length:
                break
            start, end = max(d0, p.pos), min(d1, p.pos + p.length)
            if start < end:
                segments.append((d0, end - start))
    cu = [0]
    doc_of = []
    for doc, n in segments:
        if doc_of and doc_of[-1] == doc:
            cu[-1] += n
        else:
            cu.append(cu[-1] + n)
            doc_of.append(doc)
    return cu


@functools.lru_cache(maxsize=64)
def ring_schedule(world_size, seqlen, docs, lo, hi):
    """Ring attention's calls: ``schedule[rank][step]`` are the calls rank ``rank`` makes at
    ring step ``step`` (against the key/value shard of rank ``(rank - step) % N``), for the
    steps ``0 .. last``, where ``last`` is the last step any rank has work in: the ring stops
    there. A step the mask leaves empty has no calls. ``world_size`` may be a
    `zigzag.Layout` (then its ranks and chunks)."""
    world = as_layout(world_size).world_size
    steps = []
    for rank in range(world):
        q_pieces = zigzag_pieces(rank, world_size, seqlen)
        own = []
        for step in range(world):
            k_pieces = zigzag_pieces((rank - step) % world, world_size, seqlen)
            if step == 0 and lo is None and hi in (None, 0):
                cu = _own_block_causal(q_pieces, docs)
                window = (-1, -1 if hi is None else 0)
                length = cu[-1]
                own.append((Block(0, length, 0, length, window) if len(cu) == 2 else
                            Block(0, length, 0, length, window, tuple(cu), tuple(cu)),))
            else:
                own.append(plan_blocks(q_pieces, k_pieces, docs, lo, hi))
        steps.append(own)
    last = max((s for rank_steps in steps for s, blocks in enumerate(rank_steps) if blocks),
               default=0)
    return tuple(tuple(rank_steps[:last + 1]) for rank_steps in steps)


@functools.lru_cache(maxsize=64)
def allgather_schedule(world_size, seqlen, docs, lo, hi):
    """All-gather attention's calls: ``schedule[rank]`` computes the rank's two chunks of
    queries against the all-gathered keys in position order (key rows = positions), each query
    row in exactly one call, so no partial results need merging. ``world_size`` may be a
    `zigzag.Layout`."""
    whole = Piece(0, seqlen, 0)
    return tuple(
        plan_blocks(zigzag_pieces(rank, world_size, seqlen), (whole,), docs, lo, hi)
        for rank in range(as_layout(world_size).world_size))


def whole_sequence_block(seqlen, docs, causal, window_size):
    """The single call of the unsplit problem (Ulysses runs it on its head shard)."""
    left, right = window_size
    window = (left, 0 if causal else right)
    if len(docs) == 2:
        return Block(0, seqlen, 0, seqlen, window)
    return Block(0, seqlen, 0, seqlen, window, docs, docs)
