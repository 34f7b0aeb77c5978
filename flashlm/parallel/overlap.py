"""The one overlap pattern of the head-pipelined methods (allgather, ulysses): start stage
``g + 1``'s communication before computing stage ``g``.

On CUDA, NCCL runs an ``async_op`` collective on its own stream once the compute stream's
queued work is done, so the transfer for the next stage proceeds while this stage's kernels run;
``work.wait()`` then only makes the compute stream wait where the data is read.
"""


def prefetched(start, stages):
    """Yield ``(g, start(g))`` for ``g = 0 .. stages - 1``, calling ``start(g + 1)`` (which
    launches stage ``g + 1``'s asynchronous communication) before yielding stage ``g``."""
    pending = start(0)
    for g in range(stages):
        current = pending
        if g + 1 < stages:
            pending = start(g + 1)
        yield g, current


def wait_all(works):
    """Wait for ``(work, buffer)`` pairs and return the buffers."""
    for work, _ in works:
        work.wait()
    return [buffer for _, buffer in works]
