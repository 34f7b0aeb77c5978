"""Run the long-context ladder: pretrain at 4K, then extend to 8K, 16K, 32K, 64K and 128K, each
stage starting from the previous stage's checkpoint, with a long-context evaluation after each.

    PYTHONPATH=. python3 scripts/run_ladder.py                           # the recipes as written
    PYTHONPATH=. python3 scripts/run_ladder.py --tokens-per-stage 2M     # a small budget per stage
    PYTHONPATH=. python3 scripts/run_ladder.py --stages 4k 8k --dry-run  # print the commands
    PYTHONPATH=. python3 scripts/run_ladder.py -- --logging.log_every=1  # overrides for every stage

Stage ``s`` runs::

    accelerate launch --config_file ACCELERATE_CONFIG -m flashlm.training.train recipes/longctx/100m_<s>.yaml \\
        --output_dir=<out>/<s> [--init_from=<out>/<previous stage>] [--training.steps=N ...]
    python scripts/eval/long_context.py --model <out>/<s> --seq-len <the stage's seq_len>

``--tokens-per-stage`` sets each stage's steps to cover that many tokens (at least one step)
and shortens its warmup to at most a fifth of them; tokens per step come from the recipe and
the Accelerate config's process count. A stage whose run already finished is not trained again
and one that was interrupted resumes, so a stopped ladder continues where it stopped. Every
stage's recipe is validated before the first one starts. At the end, ``<out>/ladder.md`` and
``ladder.json`` list per stage: context, rope_theta, steps, tokens seen, held-out loss, loss by
position and passkey accuracy.

The data's token cache (``data.cache_dir``) lets a machine without the ``datasets`` package
train and evaluate: build it once where ``datasets`` is installed (any run of the first stage
does), and bring the folder along.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["4k", "8k", "16k", "32k", "64k", "128k"]


def parse_count(text):
    """'2M' -> 2000000, '500K' -> 500000, '131072' -> 131072."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def processes(accelerate_config):
    config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    return int(config.get("num_processes", 1))


def finished_step(run_dir):
    """The step of the run's latest complete checkpoint, or None."""
    from flashlm.training.checkpoint import TRAINER_STATE, CheckpointManager, read_json

    latest = CheckpointManager(Path(run_dir) / "checkpoints", keep_last=1).latest()
    return None if latest is None else read_json(latest / TRAINER_STATE)["step"]


def plan(args):
    """One entry per stage: its recipe, overrides, resolved Recipe and commands."""
    from flashlm.recipe import load_recipe

    world = processes(args.accelerate_config)
    stages, previous = [], None
    for name in args.stages:
        recipe_path = Path(args.recipes) / f"{args.prefix}_{name}.yaml"
        out = Path(args.out) / name
        overrides = [f"--output_dir={out}"]
        if previous is not None:
            overrides.append(f"--init_from={previous}")
        per_stage = [o.partition(":")[2] for o in args.set if o.partition(":")[0] == name]
        recipe = load_recipe(recipe_path, overrides + per_stage + args.overrides)
        t = recipe.training
        tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * world
        if args.tokens_per_stage:
            steps = max(1, math.ceil(args.tokens_per_stage / tokens_per_step))
            overrides += [f"--training.steps={steps}",
                          f"--schedule.warmup_steps={min(recipe.schedule.warmup_steps, steps // 5)}"]
        overrides += per_stage + args.overrides
        recipe = load_recipe(recipe_path, overrides)  # validated now, before any stage runs
        train = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(args.accelerate_config),
                 "-m", "flashlm.training.train", str(recipe_path), *overrides]
        evaluate = [sys.executable, str(ROOT / "scripts" / "eval" / "long_context.py"), "--model", str(out),
                    "--seq-len", str(t.seq_len), "--passkey-trials", str(args.passkey_trials),
                    "--windows", str(args.eval_windows), "--out", str(out / "long_context.json")]
        stages.append({"name": name, "recipe": recipe, "out": out, "train": train, "eval": evaluate,
                       "tokens_per_step": tokens_per_step})
        previous = out
    return stages


def run(command, env, dry_run):
    print("+ " + shlex.join(command), flush=True)
    if not dry_run:
        subprocess.run(command, env=env, check=True)


def summarize(stages, out):
    """ladder.json and ladder.md from each stage's metrics.jsonl and long_context.json."""
    rows = []
    for stage in stages:
        recipe, run_dir = stage["recipe"], stage["out"]
        row = {"stage": stage["name"], "seq_len": recipe.training.seq_len,
               "rope_theta": recipe.model.overrides.get("rope_theta"), "steps": recipe.training.steps,
               "tokens_per_step": stage["tokens_per_step"]}
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            train = [r for r in records if "tokens_seen" in r]
            evals = [r for r in records if "eval_loss" in r]
            if train:
                row.update(tokens_seen=train[-1]["tokens_seen"], train_loss=train[-1]["loss"],
                           tokens_per_s=train[-1].get("tokens_per_s"), peak_mem_gb=train[-1].get("peak_mem_gb"))
            if evals:
                row.update(eval_loss=evals[-1]["eval_loss"])
        report = run_dir / "long_context.json"
        if report.is_file():
            lc = json.loads(report.read_text())
            buckets = lc["perplexity"]["buckets"]
            row.update(rope_theta=lc["rope_theta"], long_context_loss=lc["perplexity"]["loss"],
                       first_bucket_loss=buckets[0]["loss"],
                       last_bucket_loss=buckets[-1]["loss"], passkey=lc["passkey"]["accuracy"],
                       passkey_tokens=lc["passkey"]["token_accuracy"], passkey_trials=len(lc["passkey"]["trials"]))
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(rows, indent=1))

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| stage | context | rope_theta | steps | tokens seen | eval loss | loss at start / end of window | "
             "passkey exact (answer tokens) | tokens/s | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ends = (f"{r['first_bucket_loss']:.3f} / {r['last_bucket_loss']:.3f}" if "last_bucket_loss" in r else "-")
        passkey = "-"
        if "passkey" in r:
            passkey = f"{r['passkey']:.0%} ({r['passkey_tokens']:.0%}) of {r['passkey_trials']}"
        lines.append(f"| {r['stage']} | {r['seq_len']} | {fmt(r['rope_theta'], 'g')} | {r['steps']} | "
                     f"{fmt(r.get('tokens_seen'), ',')} | {fmt(r.get('eval_loss'), '.3f')} | {ends} | {passkey} | "
                     f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('peak_mem_gb'), '.1f')} |")
    (out / "ladder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main(args):
    stages = plan(args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for stage in stages:
        done = None if args.dry_run else finished_step(stage["out"])
        if done is not None and done >= stage["recipe"].training.steps:
            print(f"{stage['name']}: finished at step {done}, not trained again", flush=True)
        else:
            # An interrupted stage continues from its checkpoint (train refuses another recipe).
            run(stage["train"] + (["--resume"] if done is not None else []), env, args.dry_run)
        if args.eval:
            run(stage["eval"], env, args.dry_run)
        if not args.dry_run:  # after every stage, so a ladder cut short still has its table
            summarize(stages[:stages.index(stage) + 1], Path(args.out))
    return stages


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--recipes", default=str(ROOT / "recipes" / "longctx"))
    p.add_argument("--prefix", default="100m", help="recipe files are <recipes>/<prefix>_<stage>.yaml")
    p.add_argument("--out", default="runs/longctx", help="stage s trains into <out>/<s>")
    p.add_argument("--accelerate-config", default=str(ROOT / "recipes" / "accelerate" / "single_gpu.yaml"))
    p.add_argument("--tokens-per-stage", type=parse_count, help="e.g. 2M: each stage's steps cover this many tokens")
    p.add_argument("--set", action="append", default=[], metavar="STAGE:--key=value",
                   help="an override for one stage (repeatable)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the long-context evaluation")
    p.add_argument("--passkey-trials", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--dry-run", action="store_true", help="validate the recipes and print the commands")
    p.add_argument("overrides", nargs="*", help="after --: recipe overrides for every stage")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
