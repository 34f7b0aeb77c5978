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
saving leaves only a ``.tmp`` directory, which the next save of that step replaces.

Integrity: the commit records the size and SHA-256 of every file in ``checksums.json``.
``verify`` recomputes them; resume and export read only checkpoints that verify, a run
directory resolves to its newest good checkpoint (each bad one is reported by file and reason),
and pruning keeps the newest ``keep_last`` good checkpoints: a newer bad one never costs a good
one. Checkpoints written before checksums were recorded are accepted as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from flashlm.hf.convert import load_pretrained
from flashlm.model import GPT, GPTConfig
from flashlm.training.sharded_checkpoint import is_sharded_checkpoint, load_model_weights

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
RECIPE = "recipe.yaml"
CHECKSUMS = "checksums.json"
RUN_TOKENIZER = "tokenizer"  # a run keeps a copy of its tokenizer here, beside checkpoints/
_NAME = re.compile(r"^step_(\d{8})$")


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files do not match the checksums recorded when it was written."""


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
        self._good: set[Path] = set()  # written or verified by this process: not hashed again

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every complete checkpoint, oldest first (verified or not)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def good(self) -> list[tuple[int, Path]]:
        """The complete checkpoints that verify, oldest first; each one that does not is logged
        with its file and reason."""
        found = []
        for step, path in self.complete():
            problem = None if path in self._good else verify(path)
            if problem is None:
                self._good.add(path)
                found.append((step, path))
            else:
                logger.warning("checkpoint %s is unusable: %s", path, problem)
        return found

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies."""
        found = self.good()
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
        """Write our files and the checksums into the staging directory, rename it into place,
        prune old ones."""
        tmp = self.staging_path(step)
        (tmp / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        _write_json(tmp / MODEL_CONFIG, model_config)
        _write_json(tmp / CHECKSUMS, _checksums(tmp))
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
        self._good.add(final)
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` good checkpoints. Checkpoints that fail
        verification are neither counted nor deleted (they are kept for inspection)."""
        for _, path in self.good()[: -self.keep_last]:
            shutil.rmtree(path)
            self._good.discard(path)


def verify(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint``'s files do not match its recorded checksums, or None when they do (or
    when it predates checksums). Catches missing, truncated and altered files."""
    checkpoint = Path(checkpoint)
    try:
        recorded = read_json(checkpoint / CHECKSUMS)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS} cannot be read ({e})"
    try:
        read_json(checkpoint / TRAINER_STATE)
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE} cannot be read ({e})"
    for name, (size, digest) in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or altered)"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum (altered on disk)"
    return None


def _checksums(directory: Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file under ``directory``."""
    return {str(p.relative_to(directory)): [p.stat().st_size, _sha256(p)]
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names, verified: a checkpoint itself, or a run
    directory (its newest good checkpoint; the bad ones newer than it are logged). Raises
    ``FileNotFoundError`` when there is none and ``CorruptCheckpointError`` for a named
    checkpoint that fails verification."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        problem = verify(path)
        if problem is not None:
            raise CorruptCheckpointError(f"checkpoint {path} is unusable: {problem}")
        return path
    manager = CheckpointManager(path / "checkpoints", keep_last=1)
    latest = manager.latest()
    if latest is None:
        bad = manager.complete()
        if bad:
            raise CorruptCheckpointError(f"{path}: none of its {len(bad)} checkpoints verifies (see the warnings above)")
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
    """The tokenizer that belongs to ``source`` (as ``load_model`` reads it), or None.

    For a flashlm run: the copy the run keeps in ``<run>/tokenizer``; for runs without one, the
    tokenizer its recipe names, a relative path resolved against the current directory and then
    against the run's parent directories (where the run was started from), so that export works
    from anywhere. For a Hugging Face directory: the directory itself when it holds tokenizer files.
    """
    path = Path(source)
    if is_checkpoint(path):
        ckpt = resolve_checkpoint(path)
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        if run is not None and (run / RUN_TOKENIZER).is_dir():
            return str(run / RUN_TOKENIZER)
        recorded = (read_recipe(ckpt).get("data") or {}).get("tokenizer")
        if recorded is None or Path(recorded).is_absolute() or Path(recorded).exists():
            return recorded
        for parent in ckpt.resolve().parents:
            if (parent / recorded).exists():
                return str(parent / recorded)
        return recorded
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(path)
    return None


def _load_checkpoint_weights(ckpt: Path, overrides: dict[str, Any]):
    from safetensors.torch import load_file

    config = GPTConfig.from_dict(read_json(ckpt / MODEL_CONFIG) | overrides)
    model = GPT(config)
    if is_sharded_checkpoint(ckpt):  # written by an FSDP2 run: read whole, in this one process
        return load_model_weights(ckpt, model)
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
