"""The quick start: train the debug model on CPU, evaluate it, export it, and sample from it.

    python scripts/quickstart.py [--section.key=value ...]

Runs ``recipes/debug_cpu.yaml`` (overrides as for ``flashlm train``) from the repository root:
trains the ``debug`` model on the bundled corpus and tokenizer, evaluates it on the held-out
chapters, exports it to ``runs/debug_cpu/hf``, loads that directory back with
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer``, prints a generated sample, and
prints the final loss next to the corpus's unigram entropy (the loss of a model that ignores
context). Run it again and it resumes the finished run instead of training from scratch.
"""

import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "debug_cpu.yaml"
PROMPT = "It is a truth universally acknowledged, that"


def generate(export_dir: Path, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A sampled continuation of ``prompt`` from the exported model, through transformers only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str]) -> int:
    from flashlm.training.checkpoint import CheckpointManager
    from flashlm.recipe import RecipeError, load_recipe
    from flashlm.training.train import StartError
    from flashlm.training.train import main as train

    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    start = time.perf_counter()
    os.chdir(REPO)  # the recipe's paths (data/, runs/) are relative to the repository root
    try:
        cfg = load_recipe(RECIPE, argv)
        if not cfg.export.enabled:
            raise RecipeError("the quick start samples from the exported model; keep export.enabled: true")
        if not cfg.resume and CheckpointManager(Path(cfg.output_dir) / "checkpoints", 1).latest():
            print(f"{cfg.output_dir} holds a run already: resuming it (delete the folder to train from scratch)")
            cfg = load_recipe(RECIPE, [*argv, "--resume"])
        summary = train(cfg)
    except (RecipeError, StartError) as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 2

    sample = generate(Path(summary["export_dir"]), PROMPT, max_new_tokens=60, seed=0)
    loss, entropy = summary["eval_loss"], summary["unigram_entropy"]
    print(f"\nsample from {summary['export_dir']} (transformers AutoModelForCausalLM):\n\n{sample}\n")
    print(f"held-out loss       {loss:.3f} nats/token (perplexity {summary['eval_ppl']:.1f})")
    print(f"unigram entropy     {entropy:.3f} nats/token (a model that ignores context)")
    print(f"the model is {entropy - loss:.3f} nats/token below the unigram entropy; "
          f"total time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
