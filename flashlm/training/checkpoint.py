"""Training checkpoints: atomic, numbered, pruned to the last K, and loadable as a model.

A run keeps its checkpoints in ``<output_dir>/checkpoints/step_00000020/``. Each holds what
``Accelerator.save_state`` writes (model weights as ``model.safetensors``, optimizer, RNG
state of every process) plus three files of ours:

- ``recipe.yaml``: the resolved recipe of the run;
- ``model_config.json``: the ``GPTConfig`` (``to_dict``), so the weights load without a recipe;
- ``trainer_state.json``: step, data-loader position and tokens seen. The learning rate is a
  pure function of the step (``flashlm.training.optim.lr_at``), so the step is the scheduler's state.

A checkpoint is written into ``.step_00000020.tmp`` and renamed to its final name only after
every file is on disk, so a directory named ``step_*`` is always complete; a run killed while
saving leaves only a ``.tmp`` directory, which the next save of that step replaces. After a
save, all but the newest ``keep_last`` complete checkpoints are deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from flashlm.hf.convert import load_pretrained
from flashlm.model import GPT, GPTConfig

TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
RECIPE = "recipe.yaml"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointManager:
    """Names, finalizes and prunes the checkpoints under ``root`` (``<output_dir>/checkpoints``).

    Writing a checkpoint is two calls so that every process can write its part in between::

        manager.clear_staging(step)                               # main process
        accelerator.save_state(manager.staging_path(step))        # every process
        manager.commit(step, trainer_state, recipe, model_config)  # main process: rename, prune
    """

    def __init__(self, root: str | Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def staging_path(self, step: int) -> Path:
        """The temporary directory the checkpoint of ``step`` is written into before ``commit``."""
        return self.root / f".step_{step:08d}.tmp"

    def clear_staging(self, step: int) -> Path:
        """Create an empty staging directory for ``step``, replacing one a killed save left behind."""
        tmp = self.staging_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, trainer_state: dict[str, Any], recipe: dict[str, Any], model_config: dict[str, Any]) -> Path:
        """Write our files into the staging directory, rename it into place, prune old ones."""
        tmp = self.staging_path(step)
        (tmp / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        _write_json(tmp / MODEL_CONFIG, model_config)
        # Written last: its presence is what makes a directory a complete checkpoint.
        _write_json(tmp / TRAINER_STATE, trainer_state)
        final = self.path(step)
        if final.exists():
            # Re-saving a step (a resumed run that stops where it started): swap, then delete.
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints."""
        for _, path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names: a checkpoint itself, or a run directory
    (its latest complete checkpoint). Raises ``FileNotFoundError`` when there is none."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    latest = CheckpointManager(path / "checkpoints", keep_last=1).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a flashlm checkpoint nor a run directory with complete checkpoints")
    return latest


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / TRAINER_STATE).is_file() or bool(CheckpointManager(path / "checkpoints", 1).complete())


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_recipe(checkpoint: Path) -> dict[str, Any]:
    return yaml.safe_load((Path(checkpoint) / RECIPE).read_text(encoding="utf-8"))


def load_model(source: str | Path, **overrides):
    """A ``flashlm.GPT`` (CPU, fp32, train mode) from what a user calls "a model": a flashlm
    checkpoint, a run directory (its latest checkpoint), or a Hugging Face Llama directory.

    ``overrides`` are ``GPTConfig`` fields to change (e.g. ``attn_backend="sdpa"``). Raises
    ``FileNotFoundError`` naming the path when it is none of those.
    """
    path = Path(source)
    if is_checkpoint(path):
        return _load_checkpoint_weights(resolve_checkpoint(path), overrides)
    if (path / "config.json").is_file():
        return load_pretrained(path, **overrides)
    what = "does not exist" if not path.exists() else (
        "is neither a flashlm checkpoint or run directory nor a Hugging Face model directory (with config.json)")
    raise FileNotFoundError(f"{source} {what}")


def source_tokenizer(source: str | Path) -> str | None:
    """The tokenizer that belongs to ``source`` (as ``load_model`` reads it): the tokenizer a
    flashlm run's recipe names, or the Hugging Face directory itself when it holds tokenizer
    files; None when there is none."""
    path = Path(source)
    if is_checkpoint(path):
        return (read_recipe(resolve_checkpoint(path)).get("data") or {}).get("tokenizer")
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(path)
    return None


def _load_checkpoint_weights(ckpt: Path, overrides: dict[str, Any]):
    from safetensors.torch import load_file

    config = GPTConfig.from_dict(read_json(ckpt / MODEL_CONFIG) | overrides)
    model = GPT(config)
    # DDP-wrapped models save their parameters under "module."
    state = {k.removeprefix("module."): v for k, v in load_file(ckpt / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # safetensors stores tied tensors once; a missing name is fine if it shares storage with a loaded one.
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if params[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
