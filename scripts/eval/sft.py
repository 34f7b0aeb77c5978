"""Exact-match accuracy of one or more models on held-out SFT examples, overall and per task.

    python scripts/eval/sft.py MODEL [MODEL ...] [--data data/sft/test.jsonl] [--json out.json]

Each MODEL is a Hugging Face Llama/Mistral directory or a flashlm checkpoint or run directory.
Before and after fine-tuning with ``recipes/sft_debug.yaml``::

    python scripts/eval/sft.py runs/debug_cpu/hf runs/sft_debug/hf

Each model answers every example greedily (up to ``--max-new-tokens``, stopping at EOS) from
the prompt its chat template renders, with the tokenizer the model directory carries (or
``--tokenizer``); the answer is correct when it equals the reference after stripping
whitespace. Examples with a ``task`` key are also scored per task. ``--json`` writes the
provenance block of ``scripts/provenance.py`` and every model's per-example results.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import environment  # noqa: E402


@dataclass(kw_only=True)
class EvalConfig:
    models: list[str]
    data: str = "data/sft/test.jsonl"
    tokenizer: str | None = None  # default: the model directory's, or the run's recipe's
    max_new_tokens: int = 16
    show: int = 3  # wrong answers printed per model
    json: str | None = None  # also write the results here


def load(source: str, tokenizer: str | None):
    """(model, tokenizer) for a Hugging Face directory or a flashlm checkpoint/run directory."""
    from flashlm.data import load_tokenizer
    from flashlm.training.checkpoint import load_model, source_tokenizer

    tokenizer = tokenizer or source_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"{source} carries no tokenizer; pass --tokenizer")
    return load_model(source, attn_backend="sdpa").eval(), load_tokenizer(str(tokenizer))


def main(cfg: EvalConfig) -> list[dict]:
    """Score every model; prints a table and returns one summary dict per model."""
    from flashlm.data.chat import read_records, use_chat_template
    from flashlm.data.sources import resolve_files
    from flashlm.training.evaluate import exact_match

    records = read_records(resolve_files(cfg.data, "jsonl")[1])
    summaries = []
    for source in cfg.models:
        start = time.perf_counter()
        model, tokenizer = load(source, cfg.tokenizer)
        default_template = use_chat_template(tokenizer)
        accuracy, results = exact_match(model, tokenizer, records, default_template, cfg.max_new_tokens)
        per_task = defaultdict(list)
        for (record, _), result in zip(records, results):
            per_task[record.get("task", "all")].append(result["correct"])
        summaries.append({"model": source, "examples": len(results), "exact_match": accuracy,
                          "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
                          "seconds": time.perf_counter() - start, "results": results})
        for r in [r for r in results if not r["correct"]][:cfg.show]:
            print(f"  {source}: {r['where']}: expected {r['expected']!r}, got {r['got']!r}")
    tasks = sorted({t for s in summaries for t in s["per_task"]})
    print(f"\nexact match on {cfg.data} ({len(records)} examples, greedy, max {cfg.max_new_tokens} new tokens)\n")
    print(f"{'model':<32} {'all':>6} " + " ".join(f"{t:>8}" for t in tasks))
    for s in summaries:
        cells = " ".join(f"{s['per_task'].get(t, float('nan')):>8.1%}" for t in tasks)
        print(f"{s['model']:<32} {s['exact_match']:>6.1%} {cells}")
    if cfg.json:
        report = {"environment": environment("cpu"), "models": summaries}
        Path(cfg.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return summaries


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/eval/sft.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="Hugging Face directories or flashlm checkpoints/run directories")
    parser.add_argument("--data", default=EvalConfig.data, help="held-out jsonl (default %(default)s)")
    parser.add_argument("--tokenizer", help="tokenizer (default: the model's own)")
    parser.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    parser.add_argument("--show", type=int, default=EvalConfig.show, help="wrong answers to print per model")
    parser.add_argument("--json", help="write the per-example results to this file")
    args = parser.parse_args(argv)
    try:
        main(EvalConfig(**vars(args)))
    except (OSError, ValueError) as e:
        print(f"scripts/eval/sft.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
