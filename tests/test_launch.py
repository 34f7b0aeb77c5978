"""`accelerate launch` on two CPU processes (gloo): context parallelism and FSDP2 in the training
loop, against one process on the same data.

With the context-parallel size equal to the number of processes there is one data-parallel
group, so both runs read the same batches: the losses must agree to fp32 rounding (the partial
attention results and the group's loss are merged in another order). Each run is a tiny model
on flashlm's kernel under the Triton interpreter, a few seconds.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_process_env
from test_train import cache_dir, corpus, tiny_recipe  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def run(recipe_path, *overrides, config=None, name):
    """Train ``recipe_path`` (one process, or `accelerate launch --config_file config`);
    returns {step: loss} and {step: eval loss} of its metrics."""
    out = recipe_path.parent / name
    prefix = LAUNCH + ["--config_file", str(REPO / "recipes" / "accelerate" / config)] if config else [sys.executable]
    cmd = prefix + ["-m", "flashlm.training.train", str(recipe_path), f"--output_dir={out}", *overrides]
    env = cpu_process_env()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}, proc.stdout)


@pytest.fixture
def recipe(tmp_path, corpus, cache_dir):  # noqa: F811
    # Documents of 20-60 words, so that packed rows of 64 tokens hold several and their
    # boundaries fall inside shards and across the shard boundary.
    words = " ".join(json.loads(line)["text"] for line in corpus.read_text().splitlines()).split()
    docs, i, n = [], 0, 20
    while i < len(words) and len(docs) < 400:
        docs.append(" ".join(words[i:i + n]))
        i, n = i + n, 20 + (7 * len(docs)) % 41
    short = tmp_path / "short_docs.jsonl"
    short.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    raw = tiny_recipe(tmp_path / "unused", short, cache_dir)
    raw["model"]["attn_backend"] = "flash"
    raw["training"].update(steps=4, micro_batch_size=1, grad_accum_steps=2, seq_len=64, eval_every=2)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))  # YAML is a superset of JSON
    return path


def assert_same_curve(a, b, rel=2e-6):
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rel), (step, a[step], b[step])


def test_context_parallel_ring_with_documents_tracks_one_process_and_resumes(recipe):
    """Ring attention over 2 processes with packed documents crossing the shard boundary: the
    same losses as one process, with the zigzag's shards and with shards balanced by the
    documents' work (that run stopped at step 2 and resumed)."""
    one, one_eval, _ = run(recipe, "--document_mask=true", name="one")
    boundaries = _inner_boundaries(recipe)
    assert boundaries["inside"] > 10 and boundaries["crossing"] > 3, boundaries
    cp, cp_eval, out = run(recipe, "--document_mask=true", "--parallel.context_parallel_size=2",
                           config="cpu_2proc.yaml", name="cp")
    assert "(1 data-parallel x 2 context-parallel, ring)" in out
    assert_same_curve(one, cp)
    assert_same_curve(one_eval, cp_eval)
    # Shards cut by the documents' work (most rows here get a layout other than the zigzag).
    assert boundaries["rebalanced"] > boundaries["rows"] // 2, boundaries
    # Balanced by the documents' work, stopped at step 2 and resumed: the same curve again.
    balanced = ("--document_mask=true", "--parallel.context_parallel_size=2",
                "--parallel.context_parallel_balance=documents", "--ckpt_every=2")
    _, _, out = run(recipe, *balanced, "--stop_at_step=2", config="cpu_2proc.yaml", name="cut")
    assert "(1 data-parallel x 2 context-parallel, ring, documents balance)" in out
    resumed, resumed_eval, _ = run(recipe, *balanced, "--resume", config="cpu_2proc.yaml", name="cut")
    assert_same_curve(one, resumed)
    assert_same_curve(one_eval, resumed_eval)


def test_fsdp2_with_context_parallel_allgather_tracks_one_process(recipe):
    """FSDP2 over the two processes that also share each sequence (allgather attention): the
    context-parallel ranks shard the model between them, and the losses equal one process's."""
    one, one_eval, _ = run(recipe, name="one")
    both, both_eval, out = run(recipe, "--parallel.context_parallel_size=2", "--parallel.context_parallel_impl=allgather",
                               "--ckpt_every=2", "--keep_last=2", config="cpu_2proc_fsdp2.yaml", name="both")
    assert "memory per process after step 1" in out
    assert_same_curve(one, both)
    assert_same_curve(one_eval, both_eval)
    # The sharded checkpoint exports, in this one process without a process group, to the same
    # Hugging Face model as the one-process run's checkpoint (logits through transformers).
    import torch
    from transformers import AutoModelForCausalLM

    from flashlm.hf.export import ExportArgs
    from flashlm.hf.export import main as export_main
    from flashlm.training.sharded_checkpoint import is_sharded_checkpoint

    checkpoints = recipe.parent / "both" / "checkpoints"
    assert is_sharded_checkpoint(checkpoints / "step_00000004")
    exports = [export_main(ExportArgs(source=str(recipe.parent / name), output_dir=str(recipe.parent / f"{name}_hf")))
               for name in ("one", "both")]
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    logits = [AutoModelForCausalLM.from_pretrained(path)(ids).logits for path in exports]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    # As if stopped after the step-2 checkpoint, with the save of step 4 cut short on one rank
    # (its staging directory holds one rank's shard and no metadata): the resume starts from
    # step 2 and continues the same curve, resharded onto one process.
    shutil.rmtree(checkpoints / "step_00000004")
    staging = checkpoints / ".step_00000004.tmp" / "pytorch_model_fsdp_0"
    staging.mkdir(parents=True)
    (staging / "__0_0.distcp").write_bytes(b"half a shard")
    resumed, _, out = run(recipe, "--ckpt_every=2", "--keep_last=2", "--resume", name="both")
    # A resume drops the logged steps past its own, so steps 3 and 4 of the curve are its.
    assert "resuming from" in out and "step_00000002 at step 2" in out
    assert_same_curve(one, resumed)


LEVERS = ("--model.gradient_checkpointing=true", "--model.checkpoint_keep_attention=true",
          "--model.checkpoint_offload=true", "--model.loss_chunk_size=40", "--model.mlp_chunk_size=24")


def test_memory_levers_compose_with_context_parallelism(recipe):
    """Checkpointing with offloaded inputs, kept attention outputs (replayed by ring, run again
    by ulysses), a chunked loss and MLP: the same losses as one process with the same levers."""
    one, _, _ = run(recipe, *LEVERS, "--training.steps=2", "--eval_every=0", name="one")
    for impl in ("ring", "ulysses"):
        cp, _, _ = run(recipe, *LEVERS, "--training.steps=2", "--eval_every=0", "--parallel.context_parallel_size=2",
                       f"--parallel.context_parallel_impl={impl}", config="cpu_2proc.yaml", name=impl)
        assert_same_curve(one, cp)


def test_bad_context_parallel_configurations_fail_at_start(recipe):
    """Bad layouts are refused before training, with the key and the reason: one through
    `accelerate launch` (the refusal reaches the user and no run directory is made), the rest
    by the same checks in this process, against a launch of 2 processes."""
    from types import SimpleNamespace

    import torch

    from flashlm.model import GPTConfig
    from flashlm.recipe import RecipeError, load_recipe
    from flashlm.training.train import StartError, parallel_layout

    cmd = LAUNCH + ["--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m",
                    "flashlm.training.train", str(recipe), f"--output_dir={recipe.parent / 'bad'}",
                    "--parallel.context_parallel_size=4", "--seq_len=64"]
    proc = subprocess.run(cmd, env=cpu_process_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "does not divide the 2 processes" in proc.stderr, proc.stderr[-2000:]
    assert not (recipe.parent / "bad").exists()

    with pytest.raises(RecipeError, match=r"must be a multiple of 2 \* parallel.context_parallel_size"):
        load_recipe(recipe, ["--parallel.context_parallel_size=3"])
    two_processes = SimpleNamespace(num_processes=2, process_index=0, device=torch.device("cpu"))
    cases = [
        (["--parallel.context_parallel_size=2", "--model.attn_backend=sdpa"], "context parallelism runs flashlm's kernel"),
        (["--parallel.context_parallel_size=2", "--parallel.context_parallel_impl=ulysses",
          "--model.num_key_value_heads=1", "--model.num_attention_heads=3", "--model.hidden_size=48"],
         "ulysses' splits heads"),
    ]
    for overrides, message in cases:
        cfg = load_recipe(recipe, overrides)
        config = GPTConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
        with pytest.raises(StartError, match=message):
            parallel_layout(cfg, two_processes, config)


def _inner_boundaries(recipe_path):
    """How many documents of the training rows start inside a row, how many span the middle
    of their row (the boundary between the two zigzag shards of 2 ranks sits at S / 4 and 3S / 4
    in position order, the chunk edges at multiples of S / 4), and how many rows the documents
    balance of 2 ranks cuts otherwise than the zigzag."""
    from flashlm.data import load_tokenizer, prepare_data
    from flashlm.parallel.zigzag import document_layout, zigzag_layout
    from flashlm.recipe import load_recipe

    cfg = load_recipe(recipe_path, ["--output_dir=/nonexistent"])
    data = prepare_data(cfg.data, load_tokenizer(cfg.data.tokenizer), seq_len=cfg.training.seq_len)
    starts = data.train.starts[:, 1:]
    edges = [cfg.training.seq_len // 4 * k for k in (1, 2, 3)]
    crossing = sum(1 for row in data.train.starts for e in edges if not row[e])
    seq_len = cfg.training.seq_len
    layouts = [document_layout(seq_len, 2, (0, *(int(i) for i in row.nonzero()[0] if i > 0), seq_len))
               for row in data.train.starts]
    rebalanced = sum(layout != zigzag_layout(2) for layout in layouts)
    return {"inside": int(starts.sum()), "crossing": crossing, "rows": len(layouts), "rebalanced": rebalanced}
