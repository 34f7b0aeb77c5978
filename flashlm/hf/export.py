"""``flashlm export``: write a model as a Hugging Face ``LlamaForCausalLM`` directory, optionally
pushing it to the Hub.

The source is a flashlm training checkpoint (or a run directory, meaning its latest checkpoint)
or a Hugging Face Llama directory (to re-shard it, change its dtype or push it)::

    flashlm export runs/debug runs/debug/hf
    flashlm export runs/debug/checkpoints/step_00000200 out/hf --dtype bfloat16 --push-to-hub me/my-model
"""

import argparse
import sys
from dataclasses import dataclass

import torch

from flashlm.hf.convert import check_export_destination, push_to_hub, save_pretrained
from flashlm.parallel.fsdp import all_finite
from flashlm.training.checkpoint import load_model, source_tokenizer
from flashlm.validation import invalid

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class ExportArgs:
    """What ``main`` exports and where.

    source: a flashlm checkpoint, a run directory, or a Hugging Face Llama directory.
    output_dir: the Hugging Face directory to write.
    tokenizer: a tokenizer directory, tokenizer.json or hub name to include; by default the
        source's own (a Hugging Face directory's files, or the tokenizer a run's recipe names).
    dtype: "float32", "bfloat16" or "float16"; by default the weights' dtype.
    max_shard_size: e.g. "5GB"; larger models are sharded with an index.
    push_to_hub: a Hub repository id to upload the directory to.
    private: create the Hub repository as private.
    overwrite: replace an ``output_dir`` that already holds files (refused otherwise). A flashlm
        run or checkpoint directory is never written into.
    """

    source: str
    output_dir: str
    tokenizer: str | None = None
    dtype: str | None = None
    max_shard_size: str = "5GB"
    push_to_hub: str | None = None
    private: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(invalid("--dtype", self.dtype, f"expected one of {sorted(DTYPES)}"))


def main(cfg):
    """Export ``cfg.source`` to ``cfg.output_dir`` (and push it); returns the output directory."""
    check_export_destination(cfg.output_dir, cfg.overwrite)
    model = load_model(cfg.source)
    if not all_finite(model.parameters()):
        raise ValueError(f"{cfg.source} holds NaN or infinite weights; refusing to export them")
    tokenizer = cfg.tokenizer or source_tokenizer(cfg.source)
    if tokenizer is not None:
        from flashlm.data import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer))
    out = save_pretrained(model, cfg.output_dir, tokenizer=tokenizer,
                          dtype=DTYPES[cfg.dtype] if cfg.dtype else None, max_shard_size=cfg.max_shard_size,
                          overwrite=cfg.overwrite)
    print(f"exported {model.num_params():,} parameters to {out}" + ("" if tokenizer else " (no tokenizer)"))
    if cfg.push_to_hub:
        push_to_hub(out, cfg.push_to_hub, private=cfg.private)
        print(f"pushed {out} to https://huggingface.co/{cfg.push_to_hub}")
    return out


def cli(argv):
    parser = argparse.ArgumentParser(prog="flashlm export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="flashlm checkpoint, run directory, or Hugging Face Llama directory")
    parser.add_argument("output_dir", help="Hugging Face directory to write")
    parser.add_argument("--tokenizer", help="tokenizer to include (default: the source's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype on disk (default: unchanged)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights past this size (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the directory to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace an output_dir that already holds files")
    args = parser.parse_args(argv)
    try:
        main(ExportArgs(**vars(args)))
    except (OSError, ValueError, RuntimeError) as e:  # bad source, unsupported checkpoint, offline Hub
        print(f"flashlm export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
