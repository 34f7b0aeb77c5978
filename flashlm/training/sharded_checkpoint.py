"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its own
shards in parallel, and any number of processes reads them back.

The layout is the one ``Accelerator.save_state`` writes for an FSDP2 model with sharded state
dicts, so a training run's checkpoints and these functions read each other::

    <checkpoint>/pytorch_model_fsdp_0/   .metadata, __<rank>_0.distcp   {"model": model state}
    <checkpoint>/optimizer_0/            .metadata, __<rank>_0.distcp   {"optimizer": optimizer state}

The model state is keyed by parameter name (a tied LM head under both names), the optimizer
state by parameter name too (``get_optimizer_state_dict``), never by position. DCP stores each
tensor with its global shape and the offsets of every rank's shard, so a load at another number
of processes reads what each new shard covers (resharding on load), and one process without a
process group reads whole tensors (``load_model_weights``: export needs no GPUs).

Atomicity is the caller's: write into a staging directory and rename it when every rank is done
(``flashlm.training.checkpoint.CheckpointManager``); DCP writes ``.metadata`` last, after all
ranks' shards.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

MODEL_DIR = f"{FSDP_MODEL_NAME}_0"
OPTIMIZER_DIR = f"{OPTIMIZER_NAME}_0"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a model saved through DCP (by ``save_sharded`` or Accelerate's FSDP2)."""
    return (Path(path) / MODEL_DIR / ".metadata").is_file()


def _plain_optimizer(optimizer):
    # DCP's optimizer helpers run a step to create a missing state: on Accelerate's wrapper that
    # step would also advance its fp16 grad scaler.
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def save_sharded(path: str | Path, model, optimizer=None) -> None:
    """Write ``model``'s (and ``optimizer``'s) state under ``path``, each rank its own shards.

    A collective: every rank calls it with the same ``path``. ``model`` is sharded (FSDP2) or
    plain (one process, or DDP: its replicated tensors are written once).
    """
    path = Path(path)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=path / MODEL_DIR)
    if optimizer is not None:
        state = {"optimizer": get_optimizer_state_dict(model, _plain_optimizer(optimizer))}
        dcp.save(state, checkpoint_id=path / OPTIMIZER_DIR)


def load_sharded(path: str | Path, model, optimizer=None) -> None:
    """Load ``save_sharded``'s (or Accelerate's) checkpoint into ``model`` (and ``optimizer``), as
    sharded as they are now, whatever the number of processes that wrote it.

    A collective: every rank calls it. The optimizer must hold ``model``'s parameters
    (Accelerate's wrapper is fine); one that has not stepped yet gets its state created first.
    """
    path = Path(path)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path / MODEL_DIR)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        optimizer = _plain_optimizer(optimizer)
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path / OPTIMIZER_DIR)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_model_weights(path: str | Path, model):
    """Fill a plain (unsharded) ``model`` in place with the full weights of a sharded checkpoint,
    in a single process: no process group and no GPUs are needed. Returns ``model``.

    Raises ``FileNotFoundError`` when ``path`` holds no sharded model, and DCP's error naming the
    parameter when the checkpoint lacks one of the model's.
    """
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} holds no sharded model ({MODEL_DIR}/.metadata)")
    state = {"model": model.state_dict()}  # tensors that share the parameters' storage
    with warnings.catch_warnings():  # DCP warns that it loads in one process: what is asked here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(path) / MODEL_DIR, no_dist=True)
    model.load_state_dict(state["model"])
    return model
