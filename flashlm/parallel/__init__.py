"""flashlm's parallelism: context parallelism here, FSDP2 sharding in `flashlm.parallel.fsdp`.

Context parallelism splits one long sequence over the ranks of a process group.

`shard_sequence` / `unshard_sequence` move between a full sequence and a rank's shard (the
zigzag, or a `Layout` such as `document_layout`'s, which balances packed documents);
`context_parallel_attention` runs attention on the shards with flashlm's kernel ("ring",
"allgather" or "ulysses"); `simulate_context_parallel` runs each rank's share one after another
on a single device to measure the work split. `apply_context_parallel`, `shard_batch` and
`group_loss` put a model, its batches and its loss on a context-parallel group (the training
loop's use). docs/context_parallel.md describes the design.
"""

from flashlm.parallel.context_model import ContextParallel, apply_context_parallel, group_loss, shard_batch
from flashlm.parallel.context_parallel import context_parallel_attention
from flashlm.parallel.simulate import simulate_context_parallel
from flashlm.parallel.zigzag import Layout, document_layout, shard_sequence, unshard_sequence

__all__ = ["ContextParallel", "Layout", "apply_context_parallel", "context_parallel_attention", "document_layout",
           "group_loss", "shard_batch", "shard_sequence", "simulate_context_parallel", "unshard_sequence"]
