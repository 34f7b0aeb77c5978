"""The long-context tools on CPU: the ladder's recipes and plan, the long-context evaluation, and
the memory sweep's logic (a dry run with a simulated out-of-memory)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script
from flashlm import GPT, GPTConfig
from flashlm.hf import save_pretrained, to_hf_config
from flashlm.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["4k", "8k", "16k", "32k", "64k", "128k"]


# --- recipes and the ladder -----------------------------------------------------------------

def test_ladder_recipes_chain_and_keep_tokens_per_step():
    recipes = [load_recipe(ROOT / "recipes" / "longctx" / f"100m_{s}.yaml") for s in STAGES]
    thetas = [GPTConfig.from_preset("100m").rope_theta] + [r.model.overrides["rope_theta"] for r in recipes[1:]]
    for i, (stage, r) in enumerate(zip(STAGES, recipes)):
        t = r.training
        assert t.seq_len == 4096 * 2**i and r.model.overrides["max_position_embeddings"] == t.seq_len, stage
        assert t.micro_batch_size * t.grad_accum_steps * t.seq_len == 128 * 1024, stage
        assert r.output_dir == f"runs/longctx/{stage}"
        assert r.init_from == (None if i == 0 else recipes[i - 1].output_dir), stage
        if i:
            assert thetas[i] > thetas[i - 1] and r.schedule.warmup_steps <= 20, stage
            # The NTK-aware rule the recipes state, to two significant digits.
            assert math.isclose(thetas[i], 5e5 * 2 ** (i * 64 / 62), rel_tol=0.03), stage
    # The HF export carries the raised theta: a plain rope_theta, no scaling to translate.
    config = GPTConfig.from_preset("100m", vocab_size=4096, **recipes[-1].model.overrides)
    hf = to_hf_config(config)
    assert hf["rope_theta"] == 1.8e7 and hf["max_position_embeddings"] == 131072


def test_ladder_plan_with_a_token_budget():
    ladder = load_script("run_ladder")
    args = ladder.parse_args(["--tokens-per-stage", "2M", "--out", "runs/x", "--dry-run", "--",
                              "--logging.log_every=1"])
    stages = ladder.plan(args)
    assert [s["name"] for s in stages] == STAGES
    for i, stage in enumerate(stages):
        r = stage["recipe"]
        assert r.training.steps == math.ceil(2_000_000 / (128 * 1024)) == 16
        assert r.schedule.warmup_steps == 3 and r.logging.log_every == 1
        assert r.output_dir == f"runs/x/{stage['name']}"
        assert r.init_from == (None if i == 0 else f"runs/x/{STAGES[i - 1]}")
        assert stage["train"][1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
        assert stage["eval"][stage["eval"].index("--seq-len") + 1] == str(r.training.seq_len)
    assert ladder.parse_count("500K") == 500_000 and ladder.parse_count("131072") == 131072


# --- long-context evaluation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A random flashlm model exported as a Hugging Face directory with the bundled tokenizer."""
    from flashlm.data import load_tokenizer

    torch.manual_seed(0)
    config = GPTConfig.from_preset("debug", vocab_size=4096, num_hidden_layers=2, attn_backend="sdpa")
    path = tmp_path_factory.mktemp("hf")
    save_pretrained(GPT(config), path, tokenizer=load_tokenizer(str(ROOT / "data" / "tokenizer")))
    return path


def test_passkey_prompt_layout():
    ev = load_script("eval/long_context")
    from flashlm.data import load_tokenizer

    tokenizer = load_tokenizer(str(ROOT / "data" / "tokenizer"))
    stream = torch.arange(100, 3100)
    for depth in (0.0, 0.5, 1.0):
        ids, start, answer = ev.passkey_prompt(tokenizer, stream, 600, 31415, depth, offset=7)
        assert len(ids) == 600 and ids[start:].tolist() == answer
        assert tokenizer.decode(answer).strip() == "31415"
        text = tokenizer.decode(ids)
        assert text.endswith("What is the pass key? The pass key is 31415")
        needle = text.index("The pass key is 31415. Remember it")
        assert text.startswith("Somewhere in the long text")
        if depth == 0.0:
            assert needle < len(ev.INTRO) + 5
        if depth == 1.0:
            assert needle > len(text) - 120


def test_eval_long_context_reports_buckets_and_passkey(tiny_hf_model, tmp_path):
    ev = load_script("eval/long_context")
    out = tmp_path / "report.json"
    report = ev.main(ev.parse_args([
        "--model", str(tiny_hf_model), "--seq-len", "256",
        "--data", str(ROOT / "data" / "corpus" / "austen_persuasion.jsonl"),
        "--windows", "2", "--buckets", "4", "--passkey-trials", "3", "--device", "cpu", "--out", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    p = report["perplexity"]
    assert [(b["start"], b["end"]) for b in p["buckets"]] == [(0, 32), (32, 64), (64, 128), (128, 256)]
    assert sum(b["tokens"] for b in p["buckets"]) == p["tokens"] == 2 * 255
    assert all(abs(b["loss"] - math.log(4096)) < 0.5 for b in p["buckets"])  # an untrained model
    assert [t["depth"] for t in report["passkey"]["trials"]] == [0.0, 0.5, 1.0]
    assert 0.0 <= report["passkey"]["accuracy"] <= report["passkey"]["token_accuracy"] <= 1.0


# --- memory sweep ---------------------------------------------------------------------------

def test_memory_sweep_dry_run_records_oom_and_skips_longer_contexts(tmp_path):
    """The sweep's logic on CPU: rows that need CUDA are 'unavailable', a simulated out-of-memory
    is recorded and ends its row, the others run every context; JSON, table and plot are written."""
    out = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "scripts" / "bench" / "memory_sweep.py"), "--device", "cpu", "--preset", "debug",
               "--rows", "flashlm", "flashlm_eager", "hf", "--contexts", "64", "512", "1024", "--tokens-per-step",
               "64", "--steps", "1", "--cpu-memory-limit-mb", "26", "--out", str(out), "--commit", "abc"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((out / "memory_sweep.json").read_text())
    status = {(r["row"], r["context"]): r["status"] for r in data["results"]}
    assert status == {("flashlm", 64): "unavailable", ("flashlm", 512): "unavailable", ("flashlm", 1024): "unavailable",
                      ("hf", 64): "ok", ("hf", 512): "ok", ("hf", 1024): "oom",
                      ("flashlm_eager", 64): "ok", ("flashlm_eager", 512): "oom", ("flashlm_eager", 1024): "skipped"}
    ok = [r for r in data["results"] if r["status"] == "ok"]
    for r in ok:
        assert r["tokens_per_step"] == max(64, r["context"]) and r["peak_gib"] > 0 and r["tokens_per_s"] > 0
    assert data["environment"]["git_commit"] == "abc"
    table = (out / "memory_sweep.md").read_text()
    assert re.search(r"\| 512 \| unavailable \| 0\.\d+ \| OOM \|", table) and "out of memory at 512" in table
    assert (out / "memory_sweep.png").stat().st_size > 0


def test_memory_sweep_undoes_liger_patches(monkeypatch):
    """The plain HF row must not run liger's kernels: whatever apply_liger_kernel_to_llama
    patches in transformers' Llama module (module names, class methods) is restored."""
    import types

    from transformers.models.llama import modeling_llama as llama

    sweep = load_script("bench/memory_sweep")
    before = (llama.LlamaRMSNorm, llama.LlamaMLP, llama.apply_rotary_pos_emb, llama.LlamaForCausalLM.forward)

    def fake_apply(**kwargs):  # patches the way liger-kernel does
        llama.LlamaRMSNorm, llama.LlamaMLP, llama.apply_rotary_pos_emb = object, object, None
        llama.LlamaForCausalLM.forward = lambda self: None
        llama.LlamaModel.added_by_liger = True

    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module.apply_liger_kernel_to_llama = fake_apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
    with sweep.liger_patched():
        assert llama.LlamaMLP is object
    after = (llama.LlamaRMSNorm, llama.LlamaMLP, llama.apply_rotary_pos_emb, llama.LlamaForCausalLM.forward)
    assert all(a is b for a, b in zip(before, after)) and not hasattr(llama.LlamaModel, "added_by_liger")


def test_memory_sweep_runs_the_comparison_first():
    """A tight time budget cuts from the end: both flashlm rows and HF + liger up to 128K, then
    flashlm at 256K, then the other rows, then the longest contexts."""
    sweep = load_script("bench/memory_sweep")
    order = [(preset, row, [c // 1024 for c in contexts])
             for preset, row, contexts in sweep.plan(sweep.parse_args(["--preset", "1b", "100m"]))]
    short = [4, 8, 16, 32, 64, 128]
    assert order == [("1b", "flashlm", short), ("1b", "hf_liger", short), ("1b", "flashlm_keepattn", short),
                     ("100m", "flashlm", short), ("100m", "hf_liger", short), ("100m", "flashlm_keepattn", short),
                     ("1b", "flashlm", [256]), ("100m", "flashlm", [256]),
                     ("1b", "hf", short), ("1b", "flashlm_sdpa", short), ("1b", "flashlm_eager", short),
                     ("100m", "hf", short), ("100m", "flashlm_sdpa", short), ("100m", "flashlm_eager", short),
                     ("1b", "flashlm", [512]), ("100m", "flashlm", [512])]
    capped = sweep.plan(sweep.parse_args(["--preset", "1b", "--rows", "hf", "flashlm", "--max-context", "65536",
                                          "hf=32768"]))
    assert [(row, [c // 1024 for c in contexts]) for _, row, contexts in capped] == [
        ("flashlm", [4, 8, 16, 32, 64]), ("hf", [4, 8, 16, 32])]
    with pytest.raises(SystemExit, match="nothing to run"):
        sweep.main(sweep.parse_args(["--device", "cpu", "--rows", "hf", "--contexts", "262144"]))
