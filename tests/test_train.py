"""Training on CPU: the CLI end to end, exact resume, checkpoints, trackers, fine-tuning,
the learning-rate schedules, and every bad input that must stop a run before it starts.

Runs use a tiny model (2 layers, hidden 64) on a slice of the bundled corpus at seq_len 64,
so each takes a few seconds; the tokenized slice is cached once for the whole module.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flashlm.recipe import RecipeError, ScheduleConfig, load_recipe, recipe_from_dict, trajectory_diff
from flashlm.training.checkpoint import CheckpointManager, load_model
from flashlm.training.optim import lr_at
from flashlm.training.train import StartError, main

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "data" / "tokenizer")


def tiny_recipe(output_dir, corpus, cache_dir):
    return {
        "output_dir": str(output_dir),
        "model": {"preset": "debug", "vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                  "attn_backend": "sdpa"},
        "data": {"path": str(corpus), "tokenizer": TOKENIZER, "eval_docs": 3, "seed": 0,
                 "cache_dir": str(cache_dir)},
        "optim": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
        "training": {"steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2, "seq_len": 64, "seed": 0,
                     "cpu": True, "mixed_precision": "no", "eval_batches": 2},
        "logging": {"progress_bar": False},
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 24-document jsonl slice of the bundled corpus (the first 3000 characters of each chapter)."""
    root = tmp_path_factory.mktemp("corpus")
    lines = (REPO / "data" / "corpus" / "austen_persuasion.jsonl").read_text(encoding="utf-8").splitlines()
    path = root / "persuasion.jsonl"
    path.write_text("".join(json.dumps({"text": json.loads(x)["text"][:3000]}) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture
def make_recipe(tmp_path, corpus, cache_dir):
    """make_recipe(*overrides, name="run") -> (Recipe, recipe.yaml path), written under tmp_path."""

    def make(*overrides, name="run"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / name, corpus, cache_dir)), encoding="utf-8")
        return load_recipe(path, list(overrides)), path

    return make


def read_metrics(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    return records, train, evals


def snapshot(root):
    """Every file under ``root`` with its bytes, to prove a failed start changed nothing."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------
# The CLI end to end


def test_cli_end_to_end(make_recipe):
    """`python -m flashlm.training.train` trains, evaluates, checkpoints (keeping the last 2) and exports
    a directory that transformers loads; its loss on the eval split is the one the run logged.
    wandb is never imported when it is not a tracker."""
    from transformers import AutoModelForCausalLM

    from flashlm.data import build_eval_loader, load_tokenizer, prepare_data

    cfg, path = make_recipe()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-X", "importtime", "-m", "flashlm.training.train", str(path), "--training.steps=4",
           "--ckpt_every=1", "--keep_last=2", "--log_every=1", "--export.enabled=true"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb" not in proc.stderr
    out = Path(cfg.output_dir)

    records, train, evals = read_metrics(out)
    assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [0, 4]
    for r in train.values():
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0
        assert r["tokens_seen"] == r["step"] * 4 * 2 * 64
    assert evals[4]["eval_loss"] < evals[0]["eval_loss"]
    # The memory this process holds, logged once: fp32 weights and gradients, AdamW's two moments.
    memory = next(r for r in records if "mem_weights_gb" in r)
    n_params = load_model(out).num_params()
    assert memory["step"] == 1 and memory["mem_weights_gb"] * 2**30 == 4 * n_params
    assert memory["mem_gradients_gb"] == memory["mem_weights_gb"]
    assert memory["mem_optimizer_gb"] * 2**30 == pytest.approx(8 * n_params, abs=1024)  # + the step counters
    assert "memory per process after step 1: weights" in proc.stdout
    assert "final eval loss" in proc.stdout and "unigram entropy" in proc.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training"]["steps"] == 4 and saved["model"]["hidden_size"] == 64

    manager = CheckpointManager(out / "checkpoints", keep_last=2)
    assert [step for step, _ in manager.complete()] == [3, 4]
    assert sorted(p.name for p in manager.root.iterdir()) == ["step_00000003", "step_00000004"]

    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ours = load_model(out).eval()
    tok = load_tokenizer(str(out / "hf"))
    data = prepare_data(cfg.data, tok, seq_len=64)
    losses = []
    with torch.no_grad():
        for i, batch in zip(range(2), build_eval_loader(data, batch_size=4)):
            ids = batch["input_ids"]
            torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
            losses.append(hf(ids, labels=ids).loss.item())
    assert sum(losses) / len(losses) == pytest.approx(evals[4]["eval_loss"], abs=1e-4)


def test_flashlm_cli_reports_recipe_errors(make_recipe, capsys):
    from flashlm.cli import main as flashlm_main

    _, path = make_recipe()
    assert flashlm_main(["train", str(path), "--training.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert "'training.stpes'" in err and "did you mean 'steps'" in err and "micro_batch_size" in err


# ---------------------------------------------------------------------------------------
# Resume


def test_resume_is_exact(make_recipe):
    """Stopped at step 4 with a save of step 6 cut short, resumed from step 4 to 8: every
    step's loss, the final eval and the final weights equal an uninterrupted 8-step run's."""
    full, _ = make_recipe("--training.steps=8", "--eval_every=2", name="full")
    main(full)

    part, _ = make_recipe("--training.steps=8", "--eval_every=2", "--ckpt_every=4", "--stop_at_step=6", name="part")
    main(part)
    manager = CheckpointManager(Path(part.output_dir) / "checkpoints", keep_last=2)
    assert [step for step, _ in manager.complete()] == [4, 6]
    # A kill while writing step 6: only the staging directory exists, without trainer_state.json.
    os.rename(manager.path(6), manager.staging_path(6))
    (manager.staging_path(6) / "trainer_state.json").unlink()
    assert manager.latest() == manager.path(4)

    resumed, _ = make_recipe("--training.steps=8", "--eval_every=2", "--ckpt_every=4", "--resume", name="part")
    main(resumed)

    records, part_train, part_evals = read_metrics(part.output_dir)
    _, full_train, full_evals = read_metrics(full.output_dir)
    # Steps 5 and 6 ran twice; the log holds them once, and every evaluation once.
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4, 6, 8]
    assert {s: r["loss"] for s, r in part_train.items()} == {s: r["loss"] for s, r in full_train.items()}
    assert {s: r["lr"] for s, r in part_train.items()} == {s: r["lr"] for s, r in full_train.items()}
    assert {s: r["eval_loss"] for s, r in part_evals.items()} == {s: r["eval_loss"] for s, r in full_evals.items()}
    a, b = load_model(full.output_dir).state_dict(), load_model(part.output_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batch_split_takes_the_same_steps(make_recipe, monkeypatch, capsys):
    """Each micro-batch of 4 rows in 2 or 4 sub-batches: the same losses and weights as whole,
    to fp32 rounding (the gradients sum in another order). With micro_batch_split auto the
    trainer runs the split its checkpointing plan asks for (here 2, forced: a CPU's memory
    never needs one)."""
    import dataclasses

    import flashlm.training.train as train

    runs = {}
    for split in (1, 2, 4):
        cfg, _ = make_recipe(f"--training.micro_batch_split={split}", "--training.steps=3", name=f"split{split}")
        main(cfg)
        runs[split] = read_metrics(cfg.output_dir)[1], load_model(cfg.output_dir).state_dict()
    planned = []

    def plan_in_two(*args, **kwargs):
        planned.append(kwargs["split"])
        return dataclasses.replace(real_plan(*args, **kwargs), split=2)

    real_plan = train.plan_for_training
    monkeypatch.setattr(train, "plan_for_training", plan_in_two)
    cfg, _ = make_recipe("--training.steps=3", "--model.gradient_checkpointing=auto", "--training.micro_batch_split=auto",
                         "--model.checkpoint_memory_budget=0.5", name="auto")
    main(cfg)
    assert planned == [True] and "each micro-batch runs as 2 sub-batches" in capsys.readouterr().out
    runs["auto"] = read_metrics(cfg.output_dir)[1], load_model(cfg.output_dir).state_dict()
    (whole_losses, whole_weights) = runs[1]
    for split in (2, 4, "auto"):
        losses, weights = runs[split]
        assert losses.keys() == whole_losses.keys()
        for step in losses:
            assert losses[step]["loss"] == pytest.approx(whole_losses[step]["loss"], rel=1e-5)
        # Adam moves every weight by about lr a step whatever its gradient's size, so a gradient
        # near 0 that rounds differently moves its weight differently: 1% of a step (lr 3e-3).
        for name, w in weights.items():
            torch.testing.assert_close(w, whole_weights[name], rtol=1e-4, atol=3e-5)


def test_sub_batches_weigh_the_targets_they_hold():
    """With labels that ignore some positions (SFT), the sub-batches' mean losses weighted by
    their shares of the targets sum to the whole batch's mean loss."""
    from flashlm.model import GPT, GPTConfig
    from flashlm.training.train import sub_batches

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("debug", vocab_size=64, num_hidden_layers=1, attn_backend="sdpa"))
    ids = torch.randint(0, 64, (4, 16))
    labels = ids.clone()
    labels[0, :12] = -100  # the first row has 3 targets, the others 15
    labels[3, :] = -100  # the last row none
    batch = {"input_ids": ids, "labels": labels, "position_ids": None}
    whole = model(input_ids=ids, labels=labels).loss
    for split in (2, 4):
        parts = sub_batches(batch, split)
        assert len(parts) == split and all(set(p) == {"input_ids", "labels"} for p, _ in parts)
        assert sum(float(w) for _, w in parts) == pytest.approx(1.0)
        total = sum(model(**p).loss * w for p, w in parts)
        torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-6)
    unlabeled = sub_batches({"input_ids": ids}, 2)
    assert [w for _, w in unlabeled] == [0.5, 0.5]
    assert sub_batches(batch, 1) == [(batch, 1.0)]


# ---------------------------------------------------------------------------------------
# Trackers


@pytest.mark.parametrize("trackers", [[], ["tensorboard"]], ids=["jsonl-only", "tensorboard"])
def test_trackers(make_recipe, trackers):
    """metrics.jsonl is always written; tensorboard receives the same per-step losses."""
    cfg, _ = make_recipe("--training.steps=3", f"--logging.trackers={','.join(trackers)}")
    main(cfg)
    out = Path(cfg.output_dir)
    _, train, evals = read_metrics(out)
    assert sorted(train) == [1, 2, 3] and sorted(evals) == [0, 3]
    events = sorted(out.rglob("events.out.tfevents.*"))
    if not trackers:
        assert events == []
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    assert scalars["loss"] == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert scalars["eval_loss"] == pytest.approx({s: r["eval_loss"] for s, r in evals.items()})


# ---------------------------------------------------------------------------------------
# Fine-tuning


def test_init_from_export_and_checkpoint(make_recipe):
    """A run that starts from another run's export (Hugging Face) or checkpoint (flashlm) starts
    from its weights: its step-0 eval loss is the source run's final eval loss."""
    source, _ = make_recipe("--training.steps=4", "--export.enabled=true", name="source")
    main(source)
    _, _, source_evals = read_metrics(source.output_dir)
    target = source_evals[4]["eval_loss"]

    for name, init_from in [("from_hf", source.export_dir), ("from_ckpt", source.output_dir)]:
        raw = recipe_from_dict(
            tiny_recipe(Path(source.output_dir).parent / name, source.data.path, source.data.cache_dir)
        ).to_dict()
        raw["model"] = {"attn_backend": "sdpa"}
        raw["init_from"] = str(init_from)
        raw["training"]["steps"] = 2
        summary = main(recipe_from_dict(raw))
        _, _, evals = read_metrics(summary["output_dir"])
        assert evals[0]["eval_loss"] == pytest.approx(target, abs=1e-5), name


# ---------------------------------------------------------------------------------------
# Bad input: clear errors before anything is written


def test_existing_run_is_never_touched(make_recipe):
    """Starting fresh on another run's output directory, resuming it with a different recipe,
    or a context longer than RoPE covers: each fails before writing, and the run is intact."""
    cfg, _ = make_recipe("--training.steps=2")
    main(cfg)
    out = Path(cfg.output_dir)
    before = snapshot(out)
    attempts = [
        (("--training.steps=2",), "already holds checkpoints of a run .*--resume"),
        (("--training.steps=2", "--optim.lr=1e-3", "--resume"), "differs in optim.lr"),
        (("--training.steps=2", "--seq_len=2048", "--resume"), "seq_len=2048 is above the model's max_position_embeddings=1024"),
    ]
    for overrides, message in attempts:
        bad, _ = make_recipe(*overrides)
        with pytest.raises(StartError, match=message):
            main(bad)
        assert snapshot(out) == before


def write_bytes(path, data):
    path.write_bytes(data)
    return path


BAD_DATA = {
    "missing file": (lambda d: d / "nope.jsonl", "no such file"),
    "empty file": (lambda d: write_bytes(d / "empty.jsonl", b""), "empty data file"),
    "jsonl line without the field": (
        lambda d: write_bytes(d / "nofield.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n'),
        r"nofield\.jsonl:2: no 'text' field",
    ),
    "not UTF-8": (lambda d: write_bytes(d / "latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1")), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_before_writing(make_recipe, tmp_path, case):
    make_path, message = BAD_DATA[case]
    cfg, _ = make_recipe(f"--data.path={make_path(tmp_path)}")
    with pytest.raises(StartError, match=message):
        main(cfg)
    assert not Path(cfg.output_dir).exists()


def test_tokenizer_larger_than_vocab(make_recipe):
    cfg, _ = make_recipe("--model.vocab_size=1000")
    with pytest.raises(StartError, match="tokenizer has 4096 tokens .* vocab_size is 1000"):
        main(cfg)
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.stpes=3"], r"unknown key in section 'training': 'training.stpes' \(did you mean 'steps'\?\)"),
        (["--trainng.steps=3"], r"unknown section: 'trainng' \(did you mean 'training'\?\)"),
        (["--model.hiden_size=3"], r"'model.hiden_size' \(did you mean 'hidden_size'\?\).*num_hidden_layers"),
        (["--optim.lr=fast"], r"optim.lr='fast' is invalid: expected a float"),
        (["--schedule.kind=linear"], r"schedule.kind='linear' is invalid: expected one of 'cosine', 'wsd', 'constant'"),
        (["--seed=1"], r"--seed is ambiguous; write one of --data.seed, --training.seed"),
        (["--training.steps=1"], r"schedule.warmup_steps=2 is invalid: must not exceed training.steps=1"),
        (["--parallel.context_parallel_impl=ulysses", "--parallel.context_parallel_balance=documents"],
         r"parallel.context_parallel_balance='documents' is invalid: must be 'zigzag' with context_parallel_impl="),
        (["--training.micro_batch_split=3"],
         r"training.micro_batch_split=3 is invalid: must be 'auto' or a whole number >= 1 that divides "
         r"training.micro_batch_size=4"),
        (["--training.micro_batch_split=2", "--training.document_mask=true"],
         r"training.micro_batch_split=2 is invalid: must be 1 or 'auto' with training.document_mask"),
    ],
    ids=["misspelled-key", "misspelled-section", "model-field", "bad-float", "bad-choice", "ambiguous", "cross-field",
         "cp-balance", "split-divides", "split-documents"],
)
def test_recipe_errors(make_recipe, overrides, message):
    with pytest.raises(RecipeError, match=message):
        make_recipe(*overrides)


def test_recipe_file_errors(tmp_path, corpus, cache_dir):
    raw = tiny_recipe(tmp_path / "run", corpus, cache_dir)
    raw["training"]["stpes"] = raw["training"].pop("steps")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"'training.stpes'.*valid keys: steps, micro_batch_size"):
        load_recipe(path)
    del raw["training"]["stpes"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"missing required key 'training.steps'"):
        load_recipe(path)


def test_overrides_are_coerced(make_recipe):
    cfg, _ = make_recipe("--steps=9", "--optim.lr=1e-3", "--logging.trackers=tensorboard,wandb",
                         "--eval_batches=null", "--model.tie_word_embeddings=false", "--resume")
    assert cfg.training.steps == 9 and cfg.optim.lr == 1e-3
    assert cfg.logging.trackers == ["tensorboard", "wandb"] and cfg.training.eval_batches is None
    assert cfg.model.overrides["tie_word_embeddings"] is False and cfg.resume is True
    assert recipe_from_dict(cfg.to_dict()) == cfg


def test_a_recipe_saved_before_a_field_existed_resumes(make_recipe):
    """A checkpoint's recipe written by an older flashlm lacks the fields added since: each
    counts as its default, so only a non-default value (or a field since removed) differs."""
    cfg, _ = make_recipe()
    now = cfg.to_dict()
    older = copy.deepcopy(now)
    del older["data"]["retrieval_share"]
    assert trajectory_diff(older, now) == []
    mixed = copy.deepcopy(now)
    mixed["data"]["retrieval_share"] = 0.2
    assert trajectory_diff(older, mixed) == ["data.retrieval_share"]
    removed = copy.deepcopy(now)
    removed["data"]["gone_field"] = 1
    assert trajectory_diff(removed, now) == ["data.gone_field"]
    assert trajectory_diff(now, dict(now, training=dict(now["training"], steps=99))) == []  # run control


# ---------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_lr_schedules(kind):
    steps, warmup, lr, min_ratio = 100, 10, 1.0, 0.1
    schedule = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=min_ratio, decay_fraction=0.2)
    lrs = [lr_at(s, lr, schedule, steps) for s in range(steps)]
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    after = lrs[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # never rises after warmup
    if kind == "constant":
        assert after == pytest.approx([lr] * len(after))
        return
    assert lrs[-1] == pytest.approx(lr * min_ratio)
    if kind == "cosine":
        assert lrs[warmup] == pytest.approx(lr) and lrs[(warmup + steps - 1) // 2] == pytest.approx(0.55 * lr, abs=0.01)
    else:
        assert lrs[warmup:80] == pytest.approx([lr] * 70) and lrs[80] < lr


def test_checkpoint_manager_commit_and_prune(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (1, 2, 3):
        staging = manager.clear_staging(step)
        (staging / "weights").write_text(str(step))
        manager.commit(step, {"step": step}, {"recipe": 1}, {"hidden_size": 8})
    assert [s for s, _ in manager.complete()] == [2, 3]
    (manager.clear_staging(4) / "weights").write_text("partial")  # a save that never committed
    (manager.root / "step_00000005").mkdir()  # no trainer_state.json: not a checkpoint
    assert manager.latest() == manager.path(3)
    assert (manager.latest() / "weights").read_text() == "3"
