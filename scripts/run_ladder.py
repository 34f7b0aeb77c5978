"""Run the long-context ladder in one command: build the code corpus and its tokenizer, pretrain
at 4K, extend to 8K, 16K, 32K, 64K and 128K (each stage from the previous stage's checkpoint,
with its raised rope_theta), evaluate after every stage, and write ``ladder.json``,
``ladder.md`` and the plots.

    PYTHONPATH=. python3 scripts/run_ladder.py --set 4k:--model.num_hidden_layers=6 \\
        --tokens-per-stage 4k=200M 8k=8M 16k=8M 32k=6M 64k=4M 128k=3M -- --training.eval_batches=4
    PYTHONPATH=. python3 scripts/run_ladder.py ... --dry-run          # the commands and a time estimate
    PYTHONPATH=. python3 scripts/run_ladder.py ... --time-limit 540   # stop in time; run again to continue
    PYTHONPATH=. python3 scripts/run_ladder.py --plots-only           # PNGs from ladder.json (needs matplotlib)

**Corpus** (``--corpus``, default ``.cache/code_corpus``; ``none`` keeps the recipes' data):
``scripts/data/build_code_corpus.py`` builds it from the installed Python packages when it is
missing (``--corpus-args`` passes options), ``scripts/data/train_tokenizer.py`` trains its
tokenizer (with the first stage's ``model.vocab_size``) on the builder's sample, and the builder
counts its tokens, which writes the token cache the stages read. Every stage trains on
``<corpus>/train.jsonl``; the evaluation reads ``<corpus>/eval.jsonl``, packages no stage sees.

**Stage** ``s``::

    accelerate launch --config_file ACCELERATE_CONFIG -m flashlm.training.train <recipes>/<prefix>_<s>.yaml \\
        --output_dir=<out>/<s> [--init_from=<out>/<previous stage>] [--training.steps=N ...]

then, in this process, ``scripts/eval/long_context.py``'s evaluation of ``<out>/<s>`` at the
stage's length (loss by position) and at every ladder length up to it (passkey, multi-key),
and of the previous stage's model at the new length: the previous stage's own evaluation
already holds it at the shorter lengths, on the same prompts.

``--tokens-per-stage`` (one count, or ``STAGE=COUNT`` pairs) sets each stage's steps to cover
that many tokens and caps its warmup at a fifth of them; tokens per step come from the recipe
and the Accelerate config's process count. A finished stage is not trained again, an
interrupted one resumes from its newest checkpoint, and a finished evaluation cell is not
evaluated again; with ``--time-limit`` the ladder stops a stage at the deadline (it resumes from
its checkpoint next time, so stages checkpoint every tenth of their steps, every 4 at least) and an evaluation
before a batch it has no time for, writes the tables so far and exits with status 75.

**Results** (``--results``, default ``results/ladder``): ``ladder.json`` (per stage: context,
rope_theta, steps, tokens seen, tokens/s, peak memory, held-out loss, loss by position before
and after, passkey accuracy by length and depth, multi-key accuracy; the corpus report; the
plan), ``ladder.md``, ``needle_heatmap.png`` (the last stage's passkey grid) and
``loss_by_position.png`` (one curve per stage). The plots need matplotlib; without it they are
skipped with a message, and ``--plots-only`` draws them later from ``ladder.json``.

``--tiny`` is the same ladder at 1/16 of every length on the CPU with the ``debug`` model, two
steps a stage and a small evaluation grid: the test of the whole pipeline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["4k", "8k", "16k", "32k", "64k", "128k"]
TIME_LIMIT_STATUS = 75  # EX_TEMPFAIL: stopped at --time-limit, run the same command again
TINY_SCALE = 16

# Training tokens/s of the 100m model on one H100 (bf16), for the time estimate of --dry-run:
# 4K from the first ladder run (results/ladder/experiments/ladder_novels_1M.md, no
# checkpointing); 8K-128K from the memory sweep's flashlm_keepattn row
# (results/memory/memory_sweep.md, every lever on).
H100_100M_TOKENS_PER_S = {4096: 421e3, 8192: 259e3, 16384: 189e3, 32768: 127e3, 65536: 74.6e3, 131072: 40.9e3}
# Assumed forward rate of the evaluation (bf16, mostly flash attention's forward kernel, which
# measured 440-630 TFLOP/s in the kernel benchmark): an estimate, not a measurement.
EVAL_FLOPS = 300e12
# Per stage: start (imports, data, kernel compilation and autotuning) and checkpoint writes.
STAGE_OVERHEAD_S = 45


class TimeLimit(Exception):
    """The ladder reached --time-limit; what finished is kept."""


def parse_count(text):
    """'2M' -> 2000000, '500K' -> 500000, '131072' -> 131072."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_budget(items):
    """--tokens-per-stage: one count for every stage, or STAGE=COUNT pairs."""
    if items is None:
        return {}
    if len(items) == 1 and "=" not in items[0]:
        return dict.fromkeys(STAGES, parse_count(items[0]))
    budget = {}
    for item in items:
        stage, sep, count = item.partition("=")
        if not sep or stage not in STAGES:
            raise SystemExit(f"--tokens-per-stage {item!r}: write STAGE=COUNT with STAGE one of {', '.join(STAGES)}")
        budget[stage] = parse_count(count)
    return budget


def processes(accelerate_config):
    if accelerate_config == "none":
        return 1
    config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    return int(config.get("num_processes", 1))


def finished_step(run_dir):
    """The step of the run's latest complete checkpoint, or None."""
    from flashlm.training.checkpoint import TRAINER_STATE, CheckpointManager, read_json

    latest = CheckpointManager(Path(run_dir) / "checkpoints", keep_last=1).latest()
    return None if latest is None else read_json(latest / TRAINER_STATE)["step"]


def load_eval():
    """scripts/eval/long_context.py as a module: the ladder evaluates in this process."""
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "scripts" / "eval" / "long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_overrides(recipe, index):
    """The stage at 1/TINY_SCALE of its length on the CPU: the debug model, two steps."""
    seq_len = recipe.training.seq_len // TINY_SCALE
    out = [f"--training.seq_len={seq_len}", f"--model.max_position_embeddings={seq_len}",
           "--training.micro_batch_size=1", "--training.grad_accum_steps=1", "--training.steps=2",
           "--schedule.warmup_steps=0", "--training.cpu=true", "--training.mixed_precision=no",
           "--training.eval_batches=1", "--training.ckpt_every=0", "--model.attn_backend=sdpa",
           "--logging.progress_bar=false", "--logging.log_every=1", "--export.enabled=false"]
    if recipe.model.overrides.get("checkpoint_offload"):  # pinned memory and a side stream: CUDA only
        out.append("--model.checkpoint_offload=false")
    if recipe.data.min_doc_tokens:
        out.append(f"--data.min_doc_tokens={recipe.data.min_doc_tokens // TINY_SCALE}")
    if index == 0:
        out.append("--model.preset=debug")
    return out


def plan(args):
    """One entry per stage: its recipe, resolved Recipe, training command and evaluation lengths."""
    from flashlm.recipe import load_recipe

    world = processes(args.accelerate_config)
    budget = parse_budget(args.tokens_per_stage)
    data = []
    if args.corpus != "none":
        corpus = Path(args.corpus)
        data = [f"--data.path={corpus / 'train.jsonl'}", f"--data.tokenizer={corpus / 'tokenizer'}"]
    if args.accelerate_config == "none":
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(args.accelerate_config)]
    stages, previous = [], None
    for name in args.stages:
        recipe_path = Path(args.recipes) / f"{args.prefix}_{name}.yaml"
        out = Path(args.out) / name
        overrides = [f"--output_dir={out}", *data] + ([f"--init_from={previous}"] if previous is not None else [])
        per_stage = [o.partition(":")[2] for o in args.set if o.partition(":")[0] == name]
        if args.tiny:
            overrides += tiny_overrides(load_recipe(recipe_path, overrides), STAGES.index(name))
        recipe = load_recipe(recipe_path, overrides + per_stage + args.overrides)
        t = recipe.training
        tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * world
        steps = t.steps
        if name in budget:
            steps = max(1, math.ceil(budget[name] / tokens_per_step))
            overrides += [f"--training.steps={steps}",
                          f"--schedule.warmup_steps={min(recipe.schedule.warmup_steps, steps // 5)}"]
        if args.time_limit and not args.tiny:  # a stage stopped at the deadline loses a tenth at most
            overrides.append(f"--training.ckpt_every={max(min(steps, 4), steps // 10)}")
        overrides += per_stage + args.overrides
        recipe = load_recipe(recipe_path, overrides)  # validated now, before any stage runs
        seq_len = recipe.training.seq_len
        scale = TINY_SCALE if args.tiny else 1
        lengths = [4096 * 2**i // scale for i in range(len(STAGES)) if 4096 * 2**i // scale <= seq_len]
        stages.append({"name": name, "recipe": recipe, "out": out, "before": recipe.init_from,
                       "train": [*launcher, "-m", "flashlm.training.train", str(recipe_path), *overrides],
                       "lengths": lengths, "tokens_per_step": tokens_per_step})
        previous = out
    return stages


def eval_arguments(stage, args):
    """The evaluation's command line for a stage (run in this process, printed for reference)."""
    out = stage["out"]
    argv = ["--model", str(out), "--seq-len", str(stage["recipe"].training.seq_len),
            "--lengths", *map(str, stage["lengths"]), "--out", str(out / "long_context.json"),
            "--cache-dir", str(stage["recipe"].data.cache_dir or "none")]
    if stage["before"] is not None:
        argv += ["--before", str(stage["before"]), "--before-lengths", str(stage["lengths"][-1])]
    if args.corpus != "none":
        argv += ["--data", str(Path(args.corpus) / "eval.jsonl")]
    if args.tiny:
        argv += ["--device", "cpu", "--windows", "1", "--first-bucket", "16", "--depths", "2", "--trials", "2",
                 "--multikey-keys", "2", "--multikey-trials", "2", "--copy-trials", "1"]
    return argv + shlex.split(args.eval_args)


def estimate(stages):
    """Seconds (training, evaluation) per stage: the 100m model's H100 tokens/s scaled by the
    ratio of its FLOPs per token to the ladder's model's (the first stage's preset and
    overrides), and the evaluation's FLOPs at EVAL_FLOPS. A guide, not a measurement: smaller
    models use the GPU less well than the ratio says."""
    import torch

    from flashlm.model import GPT, GPTConfig

    first = stages[0]["recipe"].model
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(first.preset or "100m", **first.overrides))
        reference = GPT(GPTConfig.from_preset("100m", vocab_size=model.config.vocab_size))
    rows = []
    for stage in stages:
        r = stage["recipe"]
        seq_len = r.training.seq_len
        rate = H100_100M_TOKENS_PER_S.get(seq_len, min(H100_100M_TOKENS_PER_S.values()))
        rate *= reference.flops_per_token(seq_len) / model.flops_per_token(seq_len)
        tokens = r.training.steps * stage["tokens_per_step"]
        forward = [model.flops_per_token(length) / 3 * length for length in stage["lengths"]]
        # Per length: depths x trials passkey prompts, the multi-key and code-facts prompts;
        # the loss windows; the model before the stage at the new length.
        evals = (sum(forward) * (10 * 20 + 2 * 20)
                 + forward[-1] * (8 + 10 * 20 + 2 * 20 + (8 if stage["before"] else 0))) / EVAL_FLOPS
        rows.append({"stage": stage["name"], "tokens": tokens, "train_s": tokens / rate + STAGE_OVERHEAD_S,
                     "eval_s": evals})
    return rows


def run(command, env, deadline, what):
    """Run ``command`` (``what``, for messages); at the deadline stop it, its whole process
    group, and raise TimeLimit."""
    print("+ " + shlex.join(map(str, command)), flush=True)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        status = process.wait(timeout=None if deadline is None else max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise TimeLimit(f"{what} stopped") from None
    if status != 0:
        raise SystemExit(f"{what} failed with status {status}: {shlex.join(map(str, command))}")


def prepare_corpus(args, first, env, deadline):
    """Build the corpus, its tokenizer and its token counts (with the token cache), each if missing."""
    corpus = Path(args.corpus)
    builder = [sys.executable, str(ROOT / "scripts" / "data" / "build_code_corpus.py"), "--out", str(corpus)]
    if not (corpus / "corpus.json").is_file():
        run(builder + shlex.split(args.corpus_args), env, deadline, "building the corpus")
    tokenizer = corpus / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        from flashlm.model import GPTConfig

        if first.model.preset is None:
            raise SystemExit(f"{tokenizer} is missing: run the ladder from its first stage, whose model.vocab_size "
                             "the tokenizer is trained to")
        vocab = first.model.overrides.get("vocab_size") or GPTConfig.from_preset(first.model.preset).vocab_size
        command = [sys.executable, str(ROOT / "scripts" / "data" / "train_tokenizer.py"), "--data",
                   str(corpus / "tokenizer_sample.jsonl"), "--vocab-size", str(vocab), "--out", str(tokenizer)]
        run(command, env, deadline, "training the tokenizer")
    report = json.loads((corpus / "corpus.json").read_text())
    if report.get("unit") != "tokens":
        run(builder + ["--report-only", "--tokenizer", str(tokenizer), "--cache-dir",
                       str(first.data.cache_dir or "none")], env, deadline, "counting the corpus's tokens")
    return json.loads((corpus / "corpus.json").read_text())


def stage_row(stage, args):
    """One stage's entry of ladder.json, from its metrics.jsonl and long_context.json."""
    recipe, run_dir = stage["recipe"], stage["out"]
    row = {"stage": stage["name"], "seq_len": recipe.training.seq_len,
           "rope_theta": recipe.model.overrides.get("rope_theta"), "steps": recipe.training.steps,
           "tokens_per_step": stage["tokens_per_step"], "min_doc_tokens": recipe.data.min_doc_tokens,
           "init_from": stage["before"] and str(stage["before"])}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [r for r in records if "tokens_per_s" in r]
        evals = [r for r in records if "eval_loss" in r]
        if train:
            # The first window holds the kernels' compilation and autotuning.
            rates = [r["tokens_per_s"] for r in (train[1:] if len(train) > 2 else train)]
            row.update(steps_done=train[-1]["step"], tokens_seen=train[-1]["tokens_seen"],
                       train_loss=train[-1]["loss"], tokens_per_s=statistics.median(rates),
                       peak_mem_gb=max((r.get("peak_mem_gb") or 0.0) for r in train) or None)
        if evals:
            row.update(eval_loss_start=evals[0]["eval_loss"], eval_loss=evals[-1]["eval_loss"])
    report = run_dir / "long_context.json"
    if report.is_file():
        lc = json.loads(report.read_text())
        row["eval_seconds"] = lc["seconds"]
        row["rope_theta"] = lc["after"]["rope_theta"]
        for role in ("after", "before"):
            keys = ("model", "rope_theta", "loss_by_position", "passkey", "copy", "multikey", "in_format")
            row[role] = lc[role] and {k: lc[role][k] for k in keys if k in lc[role]}
    return row


def summarize(stages, args, corpus, finished, show=False):
    """ladder.json and ladder.md (and the plots when matplotlib is there) in --results."""
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    from provenance import environment

    ladder = {"finished": finished, "stages": [stage_row(s, args) for s in stages], "corpus": corpus,
              "plan": {"tokens_per_stage": args.tokens_per_stage, "overrides": args.overrides, "set": args.set,
                       "accelerate_config": str(args.accelerate_config), "tiny": args.tiny},
              "environment": environment("cpu" if args.tiny else "cuda")}
    (out / "ladder.json").write_text(json.dumps(ladder, indent=1) + "\n")
    (out / "ladder.md").write_text(markdown(ladder))
    if show:
        print(markdown(ladder), flush=True)
    plots(ladder, out, required=False)
    return ladder


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(ladder):
    rows = ladder["stages"]
    lines = ([] if ladder["finished"] else ["**Unfinished**: the ladder stopped at its time limit.", ""]) + [
        "| stage | context | rope_theta | steps | tokens seen | tokens/s | peak GB | held-out loss (start -> end) | "
        "loss, first / last bucket | passkey at context, before -> after | multi-key at context, before -> after | "
        "code facts at context, before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = str(r["seq_len"])
        after, before = r.get("after"), r.get("before")

        def at_context(role, task):
            return "-" if role is None or task not in role else f"{role[task]['by_length'][key]:.0%}"

        ends = "-"
        if after:
            b = after["loss_by_position"]["buckets"]
            ends = f"{b[0]['loss']:.3f} / {b[-1]['loss']:.3f}"
        lines.append(f"| {r['stage']} | {r['seq_len']} | {fmt(r['rope_theta'], 'g')} | {r.get('steps_done', 0)} of "
                     f"{r['steps']} | {fmt(r.get('tokens_seen'), ',')} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{fmt(r.get('peak_mem_gb'), '.1f')} | {fmt(r.get('eval_loss_start'), '.3f')} -> "
                     f"{fmt(r.get('eval_loss'), '.3f')} | {ends} | {at_context(before, 'passkey')} -> "
                     f"{at_context(after, 'passkey')} | {at_context(before, 'multikey')} -> "
                     f"{at_context(after, 'multikey')} | {at_context(before, 'in_format')} -> "
                     f"{at_context(after, 'in_format')} |")
    evaluated = [r for r in rows if r.get("after")]
    if evaluated:
        lengths = evaluated[-1]["after"]["passkey"]["lengths"]
        lines += ["", "Passkey accuracy after each stage, by prompt length (mean over depths; multi-key in "
                  "parentheses):", "", "| stage | " + " | ".join(map(str, lengths)) + " |",
                  "|---|" + "---|" * len(lengths)]
        for r in evaluated:
            p, m = r["after"]["passkey"]["by_length"], r["after"]["multikey"]["by_length"]
            cells = [f"{p[str(n)]:.0%} ({m[str(n)]:.0%})" if str(n) in p else "-" for n in lengths]
            lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
        last = evaluated[-1]["after"]["passkey"]
        lines += ["", f"Passkey accuracy by depth after the {evaluated[-1]['stage']} stage ({last['trials']} trials "
                  "a cell):", "", "| length | " + " | ".join(f"{d:.2f}" for d in last["depths"]) + " |",
                  "|---|" + "---|" * len(last["depths"])]
        for n in last["lengths"]:
            lines.append(f"| {n} | " + " | ".join(f"{a:.0%}" for a in last["accuracy"][str(n)]) + " |")
        copy = evaluated[-1]["after"].get("copy")
        if copy:
            lines += ["", f"Copy accuracy (the training task in held-out text, `--copy-trials`) by depth after the "
                      f"{evaluated[-1]['stage']} stage ({copy['trials']} trials a cell):", "",
                      "| length | " + " | ".join(f"{d:.2f}" for d in copy["depths"]) + " |",
                      "|---|" + "---|" * len(copy["depths"])]
            for n in copy["lengths"]:
                lines.append(f"| {n} | " + " | ".join(f"{a:.0%}" for a in copy["accuracy"][str(n)]) + " |")
    corpus = ladder.get("corpus")
    if corpus:
        unit = corpus["unit"]
        lines += ["", f"Corpus ({unit}): " + "; ".join(
            f"{name} {row['documents']} documents, {row[unit]:,} {unit}, "
            + ", ".join(f"{row['at_least'][str(t)]} >= {t // 1024}K" for t in (32768, 131072))
            for name, row in corpus["by_length"].items()) + "."]
    return "\n".join(lines) + "\n"


def plots(ladder, out, required):
    """needle_heatmap.png (the last evaluated stage) and loss_by_position.png (every stage)."""
    if not required and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plots (run with --plots-only where it is)", flush=True)
        return
    evaluated = [r for r in ladder["stages"] if r.get("after")]
    if not evaluated:
        return
    ev = load_eval()
    last = evaluated[-1]
    ev.plot_needle_heatmap(last["after"]["passkey"], out / "needle_heatmap.png",
                           f"passkey accuracy after the {last['stage']} stage")
    curves = []
    for i, r in enumerate(evaluated):
        curves.append((f"{r['stage']} (rope_theta {fmt(r['rope_theta'], '.2g')})", r["after"]["loss_by_position"],
                       i, False))
        if r.get("before"):
            curves.append((f"before {r['stage']}", r["before"]["loss_by_position"], i, True))
    ev.plot_loss_curves(curves, out / "loss_by_position.png",
                        "held-out loss by position after each stage (dashed: the model before it)")


def main(args):
    if args.plots_only:
        plots(json.loads((Path(args.results) / "ladder.json").read_text()), Path(args.results), required=True)
        return None
    start = time.monotonic()
    deadline = start + args.time_limit if args.time_limit else None
    stages = plan(args)
    for stage in stages:
        print(f"{stage['name']}: " + shlex.join(["scripts/eval/long_context.py", *eval_arguments(stage, args)]))
    if args.dry_run:
        for stage in stages:
            print("+ " + shlex.join(stage["train"]))
        rows = estimate(stages)
        for r in rows:
            print(f"{r['stage']}: {r['tokens'] / 1e6:.1f}M tokens, ~{r['train_s']:.0f} s training, "
                  f"~{r['eval_s']:.0f} s evaluation")
        total = sum(r["train_s"] + r["eval_s"] for r in rows)
        print(f"estimated total (from the 100m model's H100 figures): ~{total / 60:.1f} min, plus building the corpus")
        return stages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sys.path.insert(0, str(ROOT / "scripts"))  # provenance, for the results' environment block
    corpus, done = None, []
    try:
        if args.corpus != "none":
            corpus = prepare_corpus(args, stages[0]["recipe"], env, deadline)
        ev = load_eval()
        for stage in stages:
            step = finished_step(stage["out"])
            if step is not None and step >= stage["recipe"].training.steps:
                print(f"{stage['name']}: finished at step {step}, not trained again", flush=True)
            else:
                # An interrupted stage continues from its checkpoint (train refuses another recipe).
                resume = ["--resume"] if step is not None else []
                run(stage["train"] + resume, env, deadline, f"stage {stage['name']}")
            if args.eval:
                eval_args = ev.parse_args(eval_arguments(stage, args))
                eval_args.deadline = deadline
                try:
                    ev.main(eval_args)
                except ev.TimeLimit as e:
                    raise TimeLimit(f"{stage['name']} evaluation: {e}") from None
            done.append(stage)
            summarize(done, args, corpus, finished=False)  # after every stage: a cut ladder keeps its table
    except TimeLimit as e:
        summarize(done, args, corpus, finished=False, show=True)
        print(f"time limit: {e}; run the same command again to continue", flush=True)
        sys.exit(TIME_LIMIT_STATUS)
    summarize(done, args, corpus, finished=True, show=True)
    return stages


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--recipes", default=str(ROOT / "recipes" / "longctx"))
    p.add_argument("--prefix", default="100m", help="recipe files are <recipes>/<prefix>_<stage>.yaml")
    p.add_argument("--out", default="runs/longctx", help="stage s trains into <out>/<s>")
    p.add_argument("--results", default="results/ladder", help="ladder.json, ladder.md and the plots")
    p.add_argument("--corpus", default=".cache/code_corpus", help="the code corpus (built if missing); 'none': "
                                                                   "the recipes' data")
    p.add_argument("--corpus-args", default="", help="options for build_code_corpus.py, one string")
    p.add_argument("--accelerate-config", default=str(ROOT / "recipes" / "accelerate" / "single_gpu.yaml"),
                   help="'none': plain python, one process")
    p.add_argument("--tokens-per-stage", nargs="+", metavar="[STAGE=]COUNT",
                   help="e.g. 2M, or 4k=150M 8k=10M: each stage's steps cover this many tokens")
    p.add_argument("--set", action="append", default=[], metavar="STAGE:--key=value",
                   help="an override for one stage (repeatable)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the long-context evaluation")
    p.add_argument("--eval-args", default="", help="options for the evaluation, one string (e.g. '--trials 40')")
    p.add_argument("--time-limit", type=float, help="seconds: stop in time, exit 75; run again to continue")
    p.add_argument("--tiny", action="store_true", help="every length / 16, debug model, CPU: the pipeline's test")
    p.add_argument("--dry-run", action="store_true", help="validate the recipes, print the commands and an estimate")
    p.add_argument("--plots-only", action="store_true", help="draw the PNGs from <results>/ladder.json")
    p.add_argument("overrides", nargs="*", help="after --: recipe overrides for every stage")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
