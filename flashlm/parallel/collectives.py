"""The single-tensor collectives under the name this torch has: torch 2.13 renamed
``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to ``all_gather_single`` /
``reduce_scatter_single`` (the old names remain, deprecated); older releases have only the old
ones. Looked up on `torch.distributed` at each call, so a wrapper set there is seen."""

import torch.distributed as dist

ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def all_gather_single(output, input, group=None, async_op=False):
    """Every rank's ``input`` concatenated along dim 0 into ``output``."""
    return getattr(dist, ALL_GATHER)(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output, input, group=None, async_op=False):
    """The sum over ranks of ``input``, this rank's dim-0 slice of it into ``output``."""
    return getattr(dist, REDUCE_SCATTER)(output, input, group=group, async_op=async_op)
