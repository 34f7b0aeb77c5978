"""Context parallelism applied to a model and its batches: the wrapper the training loop uses.

The model does not know how many ranks share a sequence. ``apply_context_parallel`` hands it a
``ContextParallel`` (the group and the method), which its attention calls instead of the
single-device kernel; everything else in the model is per token and runs on this rank's shard
unchanged. ``shard_batch`` turns a data batch into this rank's model inputs:

- the targets are shifted *before* the sequence is split (the target of a shard's last token is
  the next shard's first), then split like the inputs;
- RoPE positions are the global ones (a batch's per-document positions, or ``arange(S)``);
- ``cu_seqlens`` keep describing the whole sequence, so documents follow the shards;
- with ``balance="documents"`` (ring and allgather) each packed sequence is split by
  `zigzag.document_layout`, computed from its ``cu_seqlens`` alike on every rank and by every
  user of the shards (the batch, the positions, attention), so the ranks' attention work stays
  equal when documents are shorter than the sequence; the zigzag otherwise.

The loss over the group is the token-weighted mean: each rank computes its mean over its own
targets, and ``group_loss`` rescales it by ``N * (its targets) / (the group's targets)``. With
gradients averaged over all data-parallel x context-parallel ranks (DDP or FSDP2 over the whole
world), that gives exactly the gradient of each sequence's mean loss, averaged over the
data-parallel groups; and the mean of the rescaled losses over all ranks is that loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flashlm.model.loss import IGNORE_INDEX
from flashlm.parallel.context_parallel import (IMPLS, REPLAYABLE, context_parallel_attention,
                                              replay_context_parallel_attention)
from flashlm.parallel.zigzag import document_layout, shard_sequence, zigzag_layout

BALANCES = ("zigzag", "documents")


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """The ranks that share each sequence (``group``), how attention is split (``impl``) and how
    a sequence is cut into shards (``balance``: "zigzag", or "documents" for ring and allgather)."""

    group: dist.ProcessGroup
    impl: str
    balance: str = "zigzag"

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"context_parallel_impl={self.impl!r} is invalid: expected one of {IMPLS}")
        if self.balance not in BALANCES:
            raise ValueError(f"context_parallel_balance={self.balance!r} is invalid: expected one of {BALANCES}")
        if self.balance == "documents" and self.impl not in REPLAYABLE:
            raise ValueError(f"context_parallel_balance='documents' applies to ring and allgather; "
                             f"context_parallel_impl={self.impl!r} balances by heads (use 'zigzag')")

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def layout(self, seqlen: int, cu_seqlens: torch.Tensor | None):
        """The `zigzag.Layout` of a whole sequence of ``seqlen`` tokens with documents
        ``cu_seqlens`` (None: one document)."""
        if self.balance == "zigzag" or cu_seqlens is None:
            return zigzag_layout(self.size)
        docs = cu_seqlens.tolist()
        if docs[-1] != seqlen:  # several sequences packed as one: attention refuses them anyway
            return zigzag_layout(self.size)
        return document_layout(seqlen, self.size, docs)

    def shard(self, x: torch.Tensor, dim: int = 1, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's shard of a whole-sequence tensor (sequence along ``dim``; documents
        ``cu_seqlens``, which the layout may follow)."""
        return shard_sequence(x, self.group, dim, self.layout(x.shape[dim], cu_seqlens))

    @property
    def replayable(self) -> bool:
        """Whether a kept attention output can be replayed (ring, allgather; see
        ``replay_context_parallel_attention``); ulysses runs its forward again."""
        return self.impl in REPLAYABLE

    def attention(self, q, k, v, window_size, cu_seqlens, deterministic, return_lse=False):
        """Causal attention of this rank's shards over the whole sequence (the model's hook)."""
        return context_parallel_attention(q, k, v, self.group, impl=self.impl, causal=True, window_size=window_size,
                                          cu_seqlens=cu_seqlens, deterministic=deterministic, return_lse=return_lse,
                                          layout=self.layout(q.shape[1] * self.size, cu_seqlens))

    def replay(self, q, k, v, out, lse, window_size, cu_seqlens, deterministic):
        """``attention`` whose forward already ran and returned ``out``, ``lse``."""
        return replay_context_parallel_attention(q, k, v, out, lse, self.group, impl=self.impl, causal=True,
                                                 window_size=window_size, cu_seqlens=cu_seqlens,
                                                 deterministic=deterministic,
                                                 layout=self.layout(q.shape[1] * self.size, cu_seqlens))


def apply_context_parallel(model, group, impl: str = "ring", balance: str = "zigzag"):
    """Make ``model`` (a ``flashlm.GPT``, sharded by FSDP2 or not) run on sequence shards over
    ``group`` with attention method ``impl`` and layout ``balance``. Returns the
    ``ContextParallel`` it now holds."""
    cp = ContextParallel(group, impl, balance)
    model.context_parallel = cp
    return cp


def shard_batch(inputs: dict, cp: ContextParallel) -> dict:
    """This rank's model inputs from ``flashlm.data.packing.model_inputs``' output (whole sequences
    of (batch, S)): ``input_ids``, shifted-then-split ``targets``, split global ``position_ids``,
    and the whole-sequence ``cu_seqlens`` / ``max_seqlen`` as they are."""
    labels = inputs["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    cu = inputs.get("cu_seqlens")
    out = {"input_ids": cp.shard(inputs["input_ids"], cu_seqlens=cu), "targets": cp.shard(targets, cu_seqlens=cu)}
    if "position_ids" in inputs:
        out["position_ids"] = cp.shard(inputs["position_ids"], cu_seqlens=cu)
    for key in ("cu_seqlens", "max_seqlen"):
        if key in inputs:
            out[key] = inputs[key]
    return out


def group_loss(loss: torch.Tensor, targets: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """``loss`` (this rank's mean over its targets) rescaled so that the mean over the group's
    ranks is the mean over all the group's targets (see the module docstring). One all-reduce of
    a count, in fp32-exact int64."""
    mine = (targets != IGNORE_INDEX).sum()
    total = mine.clone()
    dist.all_reduce(total, group=cp.group)
    return loss * (mine * cp.size / total.clamp(min=1)).to(loss.dtype)
