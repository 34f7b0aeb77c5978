"""The long-context tools on CPU: the ladder's recipes and plan, the long-context evaluation, the
whole ladder at 1/16 scale (corpus, tokenizer, two stages, evaluation, results), and the memory
sweep's logic (a dry run with a simulated out-of-memory)."""

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
from test_code_corpus import fake_site_packages

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
        # Every stage reads the code corpus; an extension trains on documents as long as its context.
        assert r.data.path == ".cache/code_corpus/train.jsonl" and r.data.tokenizer == ".cache/code_corpus/tokenizer"
        assert r.data.min_doc_tokens == (0 if i == 0 else t.seq_len), stage
        assert (r.data.eval_docs, r.data.seed) == (recipes[0].data.eval_docs, 0), stage  # the same held-out docs
        if i:
            assert thetas[i] > thetas[i - 1] and r.schedule.warmup_steps <= 20, stage
            # The NTK-aware rule the recipes state, to two significant digits.
            assert math.isclose(thetas[i], 5e5 * 2 ** (i * 64 / 62), rel_tol=0.03), stage
    # The HF export carries the raised theta: a plain rope_theta, no scaling to translate.
    config = GPTConfig.from_preset("100m", vocab_size=4096, **recipes[-1].model.overrides)
    hf = to_hf_config(config)
    assert hf["rope_theta"] == 1.8e7 and hf["max_position_embeddings"] == 131072


def test_ladder_plan_with_a_token_budget(capsys):
    ladder = load_script("run_ladder")
    args = ladder.parse_args(["--tokens-per-stage", "4k=20M", "8k=2M", "--out", "runs/x", "--corpus", "corp",
                              "--time-limit", "500", "--dry-run", "--", "--logging.log_every=1"])
    stages = ladder.main(args)
    assert [s["name"] for s in stages] == STAGES
    for i, stage in enumerate(stages):
        r = stage["recipe"]
        steps = {"4k": math.ceil(20e6 / 131072), "8k": math.ceil(2e6 / 131072)}.get(stage["name"], r.training.steps)
        assert r.training.steps == steps and r.logging.log_every == 1
        if stage["name"] in ("4k", "8k"):
            assert r.schedule.warmup_steps == min(100 if i == 0 else 20, steps // 5)
        assert r.training.ckpt_every == max(min(steps, 4), steps // 10)  # a stage cut at the time limit loses little
        assert r.output_dir == f"runs/x/{stage['name']}" and r.data.path == "corp/train.jsonl"
        assert r.init_from == stage["before"] == (None if i == 0 else f"runs/x/{STAGES[i - 1]}")
        assert stage["train"][1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
        assert stage["lengths"] == [4096 * 2**k for k in range(i + 1)]
        argv = ladder.eval_arguments(stage, args)
        assert argv[argv.index("--data") + 1] == "corp/eval.jsonl"
        assert ("--before-lengths" in argv) == (i > 0)
    printed = capsys.readouterr().out
    assert re.search(r"128k: 26\.2M tokens, ~\d+ s training, ~\d+ s evaluation", printed)
    assert ladder.parse_count("500K") == 500_000 and ladder.parse_count("131072") == 131072
    assert ladder.parse_budget(["2M"]) == dict.fromkeys(STAGES, 2_000_000)
    with pytest.raises(SystemExit, match="STAGE=COUNT"):
        ladder.parse_budget(["2k=1M"])


def test_ladder_stops_a_stage_at_the_time_limit(tmp_path):
    """A stage still running at --time-limit is stopped with its whole process group (it resumes
    from its checkpoint on the next run); a failing stage stops the ladder."""
    import time

    ladder = load_script("run_ladder")
    child = tmp_path / "child.pid"
    script = f"import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
             f"time.sleep(60)']); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(ladder.TimeLimit):
        ladder.run([sys.executable, "-c", script], dict(os.environ), time.monotonic() + 2, "a stage")
    assert time.monotonic() - start < 30
    pid = int(child.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with pytest.raises(SystemExit, match="a stage failed with status 3"):
        ladder.run([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), None, "a stage")


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


def test_retrieval_prompt_layouts():
    import random

    from flashlm.data import load_tokenizer

    ev = load_script("eval/long_context")
    tokenizer = load_tokenizer(str(ROOT / "data" / "tokenizer"))
    eos = tokenizer.eos_token_id
    haystack = ev.Haystack([torch.arange(100, 3100), torch.tensor([7, 8, eos])], eos)
    for depth in (0.0, 0.5, 1.0):
        ids, start, answer = ev.passkey_prompt(tokenizer, haystack, random.Random(1), 600, depth)
        key = tokenizer.decode(answer).strip()
        assert len(ids) == 600 and ids[start:].tolist() == answer and len(key) == 5 and key.isdigit()
        assert eos not in ids.tolist()
        text = tokenizer.decode(ids)
        assert text.startswith("Somewhere in the long text")
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        needle = text.index(f"The pass key is {key}. Remember it")
        if depth == 0.0:
            assert needle < len(ev.PASSKEY["intro"]) + 5
        if depth == 1.0:
            assert needle > len(text) - 120
    ids, start, answer = ev.multikey_prompt(tokenizer, haystack, random.Random(2), 800, 0.5, keys=4)
    text = tokenizer.decode(ids)
    stored = re.findall(r"The number stored under (\w+) is (\d+)\.", text)
    name = re.search(r"Which number is stored under (\w+)\? It is", text).group(1)
    assert len(ids) == 800 and len({n for n, _ in stored}) == 4
    assert dict(stored)[name] == tokenizer.decode(answer).strip()
    # The same seed gives the same prompt: the model before a stage reads what the one after reads.
    assert torch.equal(ev.multikey_prompt(tokenizer, haystack, random.Random(2), 800, 0.5, keys=4)[0], ids)
    # The training mix's format: the facts, and the asked-for one's line begun again at the end.
    ids, start, answer = ev.in_format_prompt(tokenizer, haystack, random.Random(3), 700, 0.25, keys=3)
    text = tokenizer.decode(ids)
    facts = re.findall(r'\n_fact_([a-z0-9]{5}) = "([0-9a-f]{6})"\n', text[:-40])
    name, value = re.search(r'\n_fact_([a-z0-9]{5}) = "([0-9a-f]{6})"\n$', text).groups()
    assert len(ids) == 700 and len(facts) == 3 and (name, value) in facts
    assert tokenizer.decode(answer) == f'{value}"\n' and text.index(f"_fact_{name}") < len(text) // 2

    # The training task in held-out text: a unique cue of the text's own tokens and random tokens
    # at the depth, and at the end the cue again, whose continuation is the answer.
    from flashlm.data.retrieval import random_token_pool

    pool = random_token_pool(tokenizer)
    special = set(tokenizer.all_special_ids)

    def occurrences(ids, run, end):
        return [i for i in range(end - len(run) + 1) if ids[i:i + len(run)] == run]

    # A haystack of four tokens, where short runs recur: the cue must grow until it is unique.
    low = ev.Haystack([torch.randint(100, 104, (3000,), generator=torch.Generator().manual_seed(0))], eos)
    cases = [(d, h, 4) for d in (0.0, 0.5, 1.0) for h in (haystack, low)] + [(t / 9, low, t) for t in range(10)]
    for depth, stack, seed in cases:
        ids, start, answer = ev.copy_prompt(tokenizer, stack, random.Random(seed), 600, depth, pool)
        ids = ids.tolist()
        assert len(ids) == 600 and ids[start:] == answer and len(answer) == ev.COPY_TOKENS
        assert not special & set(answer) and eos not in ids
        sources = occurrences(ids, answer, start)
        assert len(sources) == 1 and abs(sources[0] / 600 - depth) < 0.1
        src = sources[0]
        # Some run of 4-16 tokens before the copy repeats the one before the source and occurs
        # nowhere else before the copy: the cue points at one place.
        assert any(ids[start - k:start] == ids[src - k:src] and occurrences(ids, ids[src - k:src], start - k) == [src - k]
                   for k in range(ev.COPY_CUE_TOKENS[0], min(src, ev.COPY_CUE_TOKENS[1]) + 1))

    class Oracle(ev.Runner):
        """A 'model' whose hidden state at p is the one-hot of token p + shift: shift 1 always
        predicts the next token, so it answers every prompt; shift 0 repeats the current one."""

        def __init__(self, shift):
            self.shift, self.model = shift, torch.nn.Module()
            self.model.lm_head = torch.nn.Linear(len(tokenizer), len(tokenizer), bias=False)
            self.model.lm_head.weight.data = torch.eye(len(tokenizer))

        def hidden(self, ids):
            return torch.nn.functional.one_hot(ids.roll(-self.shift, dims=1), len(tokenizer)).float()

    prompts = [ev.passkey_prompt(tokenizer, haystack, random.Random(t), 300, t / 4) for t in range(5)]
    prompts += [ev.multikey_prompt(tokenizer, haystack, random.Random(t), 300, 0.5, keys=3) for t in range(5)]
    prompts += [ev.in_format_prompt(tokenizer, haystack, random.Random(t), 300, 0.5, keys=2) for t in range(5)]
    prompts += [ev.copy_prompt(tokenizer, haystack, random.Random(t), 300, t / 4, pool) for t in range(5)]
    assert ev.score(Oracle(1), prompts, batch_tokens=900) == (20, 20)
    assert ev.score(Oracle(0), prompts, batch_tokens=900)[0] == 0


def test_eval_reports_loss_passkey_grid_multikey_and_before(tiny_hf_model, tmp_path):
    ev = load_script("eval/long_context")
    out = tmp_path / "report.json"
    argv = ["--model", str(tiny_hf_model), "--before", str(tiny_hf_model), "--seq-len", "256",
            "--lengths", "128", "256", "--before-lengths", "256",
            "--data", str(ROOT / "data" / "corpus" / "austen_persuasion.jsonl"), "--cache-dir", str(tmp_path / "c"),
            "--windows", "2", "--first-bucket", "32", "--depths", "3", "--trials", "2", "--multikey-keys", "2",
            "--multikey-trials", "2", "--copy-trials", "2", "--device", "cpu", "--out", str(out)]
    report = ev.main(ev.parse_args(argv))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    after, before = report["after"], report["before"]
    p = after["loss_by_position"]
    assert [(b["start"], b["end"]) for b in p["buckets"]] == [(0, 32), (32, 64), (64, 128), (128, 256)]
    assert sum(b["tokens"] for b in p["buckets"]) == p["tokens"] == 2 * 255 and p["within_document"]
    assert all(abs(b["loss"] - math.log(4096)) < 0.5 for b in p["buckets"])  # an untrained model
    grid = after["passkey"]
    assert grid["depths"] == [0.0, 0.5, 1.0] and sorted(grid["accuracy"]) == ["128", "256"]
    assert all(len(row) == 3 and all(0 <= a <= 1 for a in row) for row in grid["accuracy"].values())
    assert sorted(after["multikey"]["by_length"]) == ["128", "256"] and after["multikey"]["keys"] == 2
    assert sorted(after["in_format"]["by_length"]) == ["128", "256"] and after["in_format"]["trials"] == 2
    copy = after["copy"]
    assert copy["trials"] == 2 and copy["depths"] == grid["depths"] and sorted(copy["accuracy"]) == ["128", "256"]
    assert all(0 <= t <= 1 for row in copy["answer_token_accuracy"].values() for t in row)
    assert before["copy"]["accuracy"]["256"] == copy["accuracy"]["256"]
    # The same model "before": the same prompts and windows give the same numbers.
    assert before["passkey"]["lengths"] == [256] and before["loss_by_position"] == after["loss_by_position"]
    assert before["passkey"]["accuracy"]["256"] == grid["accuracy"]["256"]
    assert before["passkey"]["answer_token_accuracy"]["256"] == grid["answer_token_accuracy"]["256"]
    assert "| 0-32 |" in out.with_suffix(".md").read_text() and "Copy accuracy" in out.with_suffix(".md").read_text()
    # Finished cells are kept: past its deadline the evaluation computes nothing new and stops at the
    # first cell it lacks; the cells it has make the same report.
    cells = json.loads(out.with_name(out.name + ".partial.json").read_text())["cells"]
    assert "after/passkey/256/2" in cells and "before/multikey/256" in cells and "after/in_format/128" in cells
    args = ev.parse_args(argv)
    args.deadline = 0.0
    assert ev.main(args)["after"] == after
    args = ev.parse_args(argv[:-2] + ["--trials", "3", "--out", str(out)])  # other settings: nothing reused
    args.deadline = 0.0
    with pytest.raises(ev.TimeLimit):
        ev.main(args)


def test_ladder_end_to_end_tiny(tmp_path):
    """The whole ladder at 1/16 scale on the CPU: the corpus from a site-packages folder, its
    tokenizer and token counts, two stages (the second from the first's checkpoint, trained on
    long documents), the evaluation after each, ladder.json, ladder.md and the plots."""
    site = fake_site_packages(tmp_path / "site")
    results = tmp_path / "results"
    command = [sys.executable, str(ROOT / "scripts" / "run_ladder.py"), "--tiny", "--stages", "4k", "8k",
               "--accelerate-config", "none", "--corpus", str(tmp_path / "corpus"), "--corpus-args",
               f"--site-packages {site} --min-package-bytes 1K --long-bytes 8K --min-eval-long 2",
               "--out", str(tmp_path / "runs"), "--results", str(results), "--",
               f"--data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ladder = json.loads((results / "ladder.json").read_text())
    assert ladder["finished"] and ladder["corpus"]["unit"] == "tokens"
    first, second = ladder["stages"]
    assert (first["seq_len"], second["seq_len"]) == (256, 512) and second["min_doc_tokens"] == 512
    for row in (first, second):
        assert row["steps_done"] == 2 and row["tokens_seen"] == 2 * row["seq_len"] and row["tokens_per_s"] > 0
        assert row["after"]["loss_by_position"]["seq_len"] == row["seq_len"]
    assert first["before"] is None and second["before"]["passkey"]["lengths"] == [512]
    assert second["after"]["passkey"]["lengths"] == [256, 512] and second["rope_theta"] == 1e6
    assert set(second["after"]["multikey"]["by_length"]) == {"256", "512"}
    assert set(second["after"]["copy"]["accuracy"]) == {"256", "512"}
    assert "| 8k | 512 |" in (results / "ladder.md").read_text() and "Copy accuracy" in (results / "ladder.md").read_text()
    for png in ("needle_heatmap.png", "loss_by_position.png"):
        assert (results / png).stat().st_size > 0
    # Again: nothing is trained or evaluated twice.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("not trained again") == 2, again.stderr[-2000:]
    rows = json.loads((results / "ladder.json").read_text())["stages"]
    assert [{**r, "eval_seconds": 0} for r in rows] == [{**r, "eval_seconds": 0} for r in ladder["stages"]]


# --- memory sweep ---------------------------------------------------------------------------

def test_memory_sweep_dry_run_records_oom_and_skips_longer_contexts(tmp_path):
    """The sweep's logic on CPU: rows that need CUDA are 'unavailable', a simulated out-of-memory
    is recorded and ends its row, the others run every context; JSON, table and plot are written."""
    out = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "scripts" / "bench" / "memory_sweep.py"), "--device", "cpu", "--preset", "debug",
               "--rows", "flashlm", "flashlm_eager", "hf", "--contexts", "64", "512", "1024", "--tokens-per-step",
               "64", "--steps", "1", "--cpu-memory-limit-mb", "26", "--profile-steps", "1", "--out", str(out),
               "--commit", "abc"]
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
        assert r["profile"]["category_ms"]["matmul"] > 0 and "mfu" not in r  # no peak FLOP/s on a CPU
    assert data["environment"]["git_commit"] == "abc"
    table = (out / "memory_sweep.md").read_text()
    assert "where the time goes" in table and re.search(r"\| hf \| 64 \| \d+ \| \d+ \|", table)
    assert re.search(r"\| 512 \| unavailable \| 0\.\d+ \| OOM \|", table) and "out of memory at 512" in table
    assert (out / "memory_sweep.png").stat().st_size > 0


def test_memory_sweep_budget_is_a_number_or_a_reference_rows_peak():
    """--budget takes GiB, a fraction, or a Hugging Face row; with a row, each context's plan
    must fit that row's measured peak there, and contexts it has no peak for keep 0.9 of the
    device."""
    import argparse
    sweep = load_script("bench/memory_sweep")
    assert sweep.parse_args(["--budget", "17.3"]).budget == 17.3
    assert sweep.parse_args(["--budget", "hf_liger"]).budget == "hf_liger"
    for bad in ("flashlm_auto", "0", "-2", "lots"):
        with pytest.raises(argparse.ArgumentTypeError, match="hf_liger"):
            sweep.budget_arg(bad)
    peaks = {("1b", "hf_liger", 4096): 17.5}
    assert sweep.reference_budget_bytes("hf_liger", peaks, "1b", 4096) == int(17.5 * 2**30)
    assert sweep.reference_budget_bytes("hf_liger", peaks, "1b", 8192) is None
    assert sweep.reference_budget_bytes(17.3, peaks, "1b", 4096) is None
    assert sweep.numeric_budget("hf_liger") == 0.9 and sweep.numeric_budget(17.3) == 17.3


def test_memory_sweep_profile_steps_must_be_a_count(capsys):
    sweep = load_script("bench/memory_sweep")
    assert sweep.parse_args(["--profile-steps", "2"]).profile_steps == 2
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--profile-steps", bad])
        assert f"'{bad}': expected a whole number of steps" in capsys.readouterr().err


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
