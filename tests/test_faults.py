"""Faults and bad input: training never ends in a broken model, and nothing a user had is lost.

Divergence (stop and skip), checkpoint integrity (checksums, fallback to the newest good
checkpoint, pruning that never costs a good one), a torn metrics line, the run-directory rules
and lock, exports that refuse to overwrite, and a kill at a random step followed by a resume.
The tiny recipe and its fixtures are test_train's.
"""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashlm.hf.export import ExportArgs
from flashlm.hf.export import main as export_main
from flashlm.recipe import RecipeError
from flashlm.training.checkpoint import CheckpointManager, load_model, verify
from flashlm.training.rundir import RunLock
from flashlm.training.train import DivergedError, StartError, cli, main
from conftest import cpu_process_env
from test_train import cache_dir, corpus, make_recipe, read_metrics, snapshot  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def checkpoints(cfg):
    return CheckpointManager(Path(cfg.output_dir) / "checkpoints", keep_last=100)


def all_finite(model):
    return all(bool(p.isfinite().all()) for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Divergence


def test_divergence_stops_at_its_step_and_keeps_the_last_good_checkpoint(make_recipe, capsys):
    """A learning rate far too high makes the loss non-finite: the run stops at that step with
    an error naming it, writes no checkpoint or export of the broken model, and the last good
    checkpoint (keep_last=1) survives and loads finite."""
    cfg, path = make_recipe("--optim.lr=1e4", "--grad_clip=0", "--warmup_steps=0", "--ckpt_every=1",
                            "--keep_last=1", "--training.steps=6", "--export.enabled=true")
    with pytest.raises(DivergedError, match=r"training diverged at step (\d+): loss .*training.on_nonfinite=stop") as e:
        main(cfg)
    bad_step = int(e.value.args[0].split("step ")[1].split(":")[0])
    good = checkpoints(cfg).complete()
    assert [s for s, _ in good] == [bad_step - 1] and bad_step >= 2
    assert str(good[-1][1]) in str(e.value)
    assert all_finite(load_model(good[-1][1]))
    assert not (Path(cfg.output_dir) / "hf").exists()
    records, train, _ = read_metrics(cfg.output_dir)
    assert records[-1]["step"] == bad_step and records[-1]["skipped"]
    assert not math_isfinite(records[-1]["loss"]) or not math_isfinite(records[-1]["grad_norm"])
    # The CLI exits non-zero with the same message.
    os.rename(cfg.output_dir, cfg.output_dir + "_first")
    assert cli([str(path), "--optim.lr=1e4", "--grad_clip=0", "--warmup_steps=0", "--training.steps=6"]) == 3
    assert "training diverged at step" in capsys.readouterr().err


def math_isfinite(x):
    return x == x and abs(x) != float("inf")


def test_divergence_skip_policy_skips_then_stops(make_recipe):
    """on_nonfinite=skip applies no update for a non-finite step and stops once more than
    max_skipped_steps were skipped."""
    cfg, _ = make_recipe("--optim.lr=1e4", "--grad_clip=0", "--warmup_steps=0", "--training.steps=12",
                         "--on_nonfinite=skip", "--max_skipped_steps=2")
    with pytest.raises(DivergedError, match=r"3 steps skipped, more than training.max_skipped_steps=2"):
        main(cfg)
    records, _, _ = read_metrics(cfg.output_dir)
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert len(skipped) == 3


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=inf", r"optim.lr=inf is invalid: must be a finite number > 0"),
    ("--optim.lr=nan", r"optim.lr=nan is invalid"),
    ("--optim.weight_decay=inf", r"optim.weight_decay=inf is invalid"),
    ("--optim.eps=0", r"optim.eps=0.0 is invalid: must be in \(0, 1\)"),
    ("--optim.eps=-1e-8", r"optim.eps=-1e-08 is invalid"),
    ("--optim.beta2=1.0", r"optim.beta2=1.0 is invalid: must be in \[0, 1\)"),
])
def test_optimizer_values_that_cannot_train_are_refused(make_recipe, override, message):
    with pytest.raises(RecipeError, match=message):
        make_recipe(override)


# ---------------------------------------------------------------------------------------
# Checkpoint integrity


def flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def optimizer_file(ckpt):
    return next(p for p in ckpt.iterdir() if p.name.startswith("optimizer"))


@pytest.mark.parametrize("damage", ["flipped weight byte", "truncated optimizer", "torn metrics line"])
def test_resume_falls_back_to_the_newest_good_checkpoint(make_recipe, caplog, damage):
    """A checkpoint damaged on disk is reported by file and reason, resume continues from the
    newest good one, and the continuation equals an uninterrupted run's losses. A torn last
    line of metrics.jsonl does not block resume."""
    full, _ = make_recipe("--training.steps=6", name="full")
    main(full)
    part, _ = make_recipe("--training.steps=6", "--ckpt_every=2", "--keep_last=3", "--stop_at_step=4", name="part")
    main(part)
    manager = checkpoints(part)
    newest = manager.path(4)
    if damage == "flipped weight byte":
        flip_byte(newest / "model.safetensors")
        assert "model.safetensors does not match its checksum" in verify(newest)
    elif damage == "truncated optimizer":
        f = optimizer_file(newest)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        assert f"{f.name} has" in verify(newest) and "truncated or altered" in verify(newest)
    else:
        with open(Path(part.output_dir) / "metrics.jsonl", "a") as f:
            f.write('{"step": 5, "loss": 4.2')  # power loss mid-write
    resumed, _ = make_recipe("--training.steps=6", "--ckpt_every=2", "--keep_last=3", "--resume", name="part")
    with caplog.at_level(logging.WARNING):
        main(resumed)
    _, part_train, _ = read_metrics(part.output_dir)
    _, full_train, _ = read_metrics(full.output_dir)
    assert {s: r["loss"] for s, r in part_train.items()} == {s: r["loss"] for s, r in full_train.items()}
    if damage != "torn metrics line":
        assert f"not resuming from {newest}" in caplog.text and "falling back to" in caplog.text
        assert str(manager.path(2)) in caplog.text
        # The rewritten step 4 replaced the damaged one, and verifies.
        assert verify(manager.path(4)) is None
    a, b = load_model(full.output_dir).state_dict(), load_model(part.output_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_good_checkpoint_is_a_clear_error(make_recipe):
    cfg, _ = make_recipe("--training.steps=4", "--ckpt_every=2", "--keep_last=2", "--stop_at_step=2")
    main(cfg)
    flip_byte(checkpoints(cfg).path(2) / "model.safetensors")
    resumed, _ = make_recipe("--training.steps=4", "--ckpt_every=2", "--keep_last=2", "--resume")
    before = snapshot(cfg.output_dir)
    with pytest.raises(StartError, match=r"no checkpoint in .* verifies \(step_00000002: model.safetensors does not "
                                         r"match its checksum"):
        main(resumed)
    assert snapshot(cfg.output_dir) == before
    with pytest.raises(ValueError, match="none of its 1 checkpoints verifies"):
        load_model(cfg.output_dir)


def test_pruning_never_costs_a_good_checkpoint(tmp_path):
    """keep_last counts good checkpoints: a newer damaged one is kept for inspection but does
    not push a good one out."""
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (1, 2, 3):
        (manager.clear_staging(step) / "weights.bin").write_bytes(bytes([step]) * 64)
        manager.commit(step, {"step": step}, {"recipe": 1}, {"hidden_size": 8})
    assert [s for s, _ in manager.complete()] == [2, 3]
    flip_byte(manager.path(3) / "weights.bin", 1)
    fresh = CheckpointManager(tmp_path / "checkpoints", keep_last=2)  # a new process: nothing cached
    (fresh.clear_staging(4) / "weights.bin").write_bytes(b"\4" * 64)
    fresh.commit(4, {"step": 4}, {"recipe": 1}, {"hidden_size": 8})
    assert [s for s, _ in fresh.complete()] == [2, 3, 4]  # 2 and 4 are the two good ones
    assert [s for s, _ in fresh.good()] == [2, 4]
    assert fresh.latest() == fresh.path(4)


# ---------------------------------------------------------------------------------------
# Nothing a user had is overwritten


def test_output_dir_rules(make_recipe, tmp_path):
    """A file, or a directory of someone else's files, is refused as output_dir before
    anything is written; a run that already finished is not resumed past its steps."""
    cfg, _ = make_recipe()
    Path(cfg.output_dir).write_text("not a directory")
    with pytest.raises(StartError, match="exists and is not a directory"):
        main(cfg)
    Path(cfg.output_dir).unlink()
    Path(cfg.output_dir).mkdir()
    (Path(cfg.output_dir) / "notes.txt").write_text("mine")
    (Path(cfg.output_dir) / "config.yaml").write_text("mine too")
    before = snapshot(cfg.output_dir)
    with pytest.raises(StartError, match=r"already holds files that are not a flashlm run \(config.yaml, notes.txt\)"):
        main(cfg)
    assert snapshot(cfg.output_dir) == before

    done, _ = make_recipe("--training.steps=4", name="done")
    main(done)
    fewer, _ = make_recipe("--training.steps=2", "--resume", name="done")
    with pytest.raises(StartError, match=r"is at step 4, past training.steps=2"):
        main(fewer)


def test_a_second_run_on_a_locked_output_dir_is_refused(make_recipe):
    cfg, _ = make_recipe("--training.steps=2")
    lock = RunLock(Path(cfg.output_dir))  # a live run holds the directory
    try:
        with pytest.raises(StartError, match=rf"is in use by another flashlm run \(pid {os.getpid()}\)"):
            main(cfg)
    finally:
        lock.release()
    main(cfg)  # released: the run starts


def test_export_refuses_to_overwrite(make_recipe, tmp_path, monkeypatch):
    """An export into a non-empty folder needs --overwrite; into a run or a checkpoint it is
    refused outright; from another working directory the run's own tokenizer is found."""
    cfg, _ = make_recipe("--training.steps=2")
    main(cfg)
    run = Path(cfg.output_dir)
    ckpt = checkpoints(cfg).complete()[-1][1]
    before = snapshot(run)
    for target in (run, ckpt, run / "checkpoints"):
        with pytest.raises(ValueError, match="is a flashlm run or checkpoint directory"):
            export_main(ExportArgs(source=str(run), output_dir=str(target), overwrite=True))
    assert snapshot(run) == before
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_text("someone's model")
    with pytest.raises(FileExistsError, match="already holds files; pass overwrite=True"):
        export_main(ExportArgs(source=str(run), output_dir=str(theirs)))
    assert (theirs / "model.safetensors").read_text() == "someone's model"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_main(ExportArgs(source=str(run), output_dir=str(theirs), overwrite=True))
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not (out / "model.safetensors").read_bytes().startswith(b"someone")


def test_export_refuses_a_non_finite_model(make_recipe, tmp_path):
    cfg, _ = make_recipe("--training.steps=2")
    main(cfg)
    ckpt = checkpoints(cfg).complete()[-1][1]
    from safetensors.torch import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match its checksum"):  # caught by the checksum first
        export_main(ExportArgs(source=str(ckpt), output_dir=str(tmp_path / "x")))
    (ckpt / "checksums.json").unlink()  # a checkpoint from before checksums: the weights are checked
    with pytest.raises(ValueError, match="holds NaN or infinite weights"):
        export_main(ExportArgs(source=str(ckpt), output_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------
# A kill at a random step


def test_kill_at_a_random_step_then_resume(make_recipe):
    """`python -m flashlm.training.train` killed with SIGKILL at a random moment of a run, then
    resumed: its losses equal an uninterrupted run's step for step. A stale lock from the
    killed process does not block the resume."""
    full, _ = make_recipe("--training.steps=8", name="full")
    main(full)
    _, path = make_recipe("--training.steps=8", "--ckpt_every=1", name="killed")
    out = Path(full.output_dir).parent / "killed"
    rng = random.Random(int(time.time()))
    kill_at = rng.randint(2, 6)  # steps logged before the kill
    env = cpu_process_env()
    proc = subprocess.Popen([sys.executable, "-m", "flashlm.training.train", str(path), "--training.steps=8",
                             "--ckpt_every=1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}"
    assert CheckpointManager(out / "checkpoints", 1).complete()
    resumed, _ = make_recipe("--training.steps=8", "--ckpt_every=1", "--resume", name="killed")
    main(resumed)
    _, killed_train, _ = read_metrics(out)
    _, full_train, _ = read_metrics(full.output_dir)
    assert {s: r["loss"] for s, r in killed_train.items()} == {s: r["loss"] for s, r in full_train.items()}
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8
