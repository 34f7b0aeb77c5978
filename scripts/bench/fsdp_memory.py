"""Per-GPU memory of FSDP2 training: a memory model, checked against one GPU, and the table users
read to choose a GPU count.

The model, for P parameters trained with fp32 master weights, bf16 compute and fused AdamW on
N GPUs (one ``fully_shard`` unit per decoder block plus the root, ``flashlm.parallel.fsdp``):

    weights      4 P / N          fp32 shards
    gradients    4 P / N          fp32 shards (reduce-scattered in fp32)
    optimizer    8 P / N          AdamW's two fp32 moments
    gathered     2 (2 U)          bf16 parameters of the unit in use and the one prefetched
                                  (U: the largest unit's parameter count; the root holds the
                                  embedding and LM head)
    unsharded    4 U              the fp32 gradient of one unit before its reduce-scatter
    activations  A                what one sequence's forward keeps for backward plus the peak of
                                  the layer being recomputed: measured on one GPU, independent of N

On the GPU (``--check``) the script trains a few steps of the ``1b`` preset under FSDP2 with one
process and compares the model (N = 1) with ``torch.cuda.max_memory_allocated``; the
activation term is the measured peak minus everything else the model counts. It then writes
the table for N = 1, 2, 4, 8 for ``1b`` and for a Llama-3.2-3B-shaped model (the activation
term scaled from the measured one by layers x hidden size, the bytes per token of checkpointed
layer inputs).

    python scripts/bench/fsdp_memory.py --check --seq-len 16384 --out results/fsdp
    python scripts/bench/fsdp_memory.py --activations-gib 3.1 --out /tmp/fsdp   # no GPU: model only
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from provenance import add_commit_argument, environment, write_report  # noqa: E402

from flashlm.model import GPT, GPTConfig  # noqa: E402

GIB = 2**30
# Llama 3.2 3B's shape (hidden 3072, 28 layers, 24 heads, 8 KV heads, SwiGLU 8192, tied 128K vocab).
SHAPES = {
    "1b": dict(),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True),
}
LEVERS = dict(attn_backend="flash", gradient_checkpointing=True, checkpoint_dtype="bfloat16",
              checkpoint_keep_attention=True, loss_chunk_size=4096, mlp_chunk_size=8192)


def config_of(name, seq_len):
    return GPTConfig.from_preset("1b", max_position_embeddings=max(seq_len, 4096), **SHAPES[name], **LEVERS)


def unit_params(model):
    """Parameter count of each FSDP unit: every block, and the root (what is left)."""
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.layers]
    return blocks, model.num_params() - sum(blocks)


def model_bytes(config, world, activations):
    """The terms of the memory model (bytes) for ``config`` on ``world`` GPUs."""
    with torch.device("meta"):
        model = GPT(config)
    blocks, root = unit_params(model)
    params, largest = model.num_params(), max(blocks + [root])
    terms = {"weights": 4 * params / world, "gradients": 4 * params / world, "optimizer": 8 * params / world,
             "gathered": 2 * 2 * largest, "unsharded_gradient": 4 * largest, "activations": activations}
    terms["total"] = sum(terms.values())
    return params, terms


def activation_scale(a, b):
    """Ratio of checkpointed-input bytes per token (layers x hidden) of config b to config a."""
    return (b.num_hidden_layers * b.hidden_size) / (a.num_hidden_layers * a.hidden_size)


def check_on_gpu(seq_len, steps):
    """Train ``steps`` steps of 1b under FSDP2 with one process; returns measured bytes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from flashlm.parallel.fsdp import apply_fsdp, memory_report, mixed_precision_policy

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        config = config_of("1b", seq_len)
        with torch.device("cuda"):
            model = GPT(config)
        apply_fsdp(model, init_device_mesh("cuda", (1,)), mixed_precision_policy("bf16"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, config.vocab_size, (1, seq_len), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            model(ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            held = memory_report(model, optimizer)
            optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated()
        return {"peak": peak, "weights": held.weights, "gradients": held.gradients, "optimizer": held.optimizer}
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens of the one sequence per step")
    parser.add_argument("--check", action="store_true", help="measure the 1b preset under FSDP2 on this GPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--activations-gib", type=float, help="activation term without --check")
    parser.add_argument("--out", type=Path, required=True, help="folder for fsdp_memory.{json,md}")
    add_commit_argument(parser)
    args = parser.parse_args(argv)
    if not args.check and args.activations_gib is None:
        parser.error("give --check (on a GPU) or --activations-gib")

    one = config_of("1b", args.seq_len)
    measured = None
    if args.check:
        measured = check_on_gpu(args.seq_len, args.steps)
        _, terms = model_bytes(one, 1, 0)
        activations = measured["peak"] - (terms["total"] - terms["activations"])
    else:
        activations = args.activations_gib * GIB
    rows = []
    for name in SHAPES:
        config = config_of(name, args.seq_len)
        act = activations * activation_scale(one, config)
        for world in (1, 2, 4, 8):
            params, terms = model_bytes(config, world, act)
            rows.append({"model": name, "params": params, "gpus": world, **{k: v / GIB for k, v in terms.items()}})
    check = None
    if measured:
        _, terms = model_bytes(one, 1, 0)
        check = {"measured_peak_gib": measured["peak"] / GIB,
                 **{f"measured_{k}_gib": measured[k] / GIB for k in ("weights", "gradients", "optimizer")},
                 **{f"model_{k}_gib": terms[k] / GIB for k in ("weights", "gradients", "optimizer")},
                 "activations_gib": activations / GIB}
    report = {"environment": environment("cuda" if args.check else "cpu", commit=args.commit),
              "seq_len": args.seq_len, "levers": LEVERS, "check": check, "rows": rows}
    write_report(args.out, "fsdp_memory", report, markdown(report))
    print(markdown(report))
    return 0


def markdown(report):
    env = report["environment"]
    lines = [f"# FSDP2 memory per GPU, one {report['seq_len'] // 1024}K sequence per GPU per step",
             "", f"{env['gpu']}, torch {env['torch']}, commit {str(env['git_commit'])[:7]}, {env['date']}. "
             "Levers: " + ", ".join(f"{k}={v}" for k, v in report["levers"].items()) + ".", ""]
    if report["check"]:
        c = report["check"]
        lines += ["Check on one GPU (FSDP2, one process, 1b): weights / gradients / optimizer measured "
                  f"{c['measured_weights_gib']:.2f} / {c['measured_gradients_gib']:.2f} / "
                  f"{c['measured_optimizer_gib']:.2f} GiB against the model's {c['model_weights_gib']:.2f} / "
                  f"{c['model_gradients_gib']:.2f} / {c['model_optimizer_gib']:.2f}; peak "
                  f"{c['measured_peak_gib']:.2f} GiB, so activations and transients {c['activations_gib']:.2f} GiB.", ""]
    lines += ["| model | params | GPUs | weights | gradients | optimizer | gathered | unsharded grad | "
              "activations | total (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['gpus']} | {r['weights']:.2f} | "
                     f"{r['gradients']:.2f} | {r['optimizer']:.2f} | {r['gathered']:.2f} | "
                     f"{r['unsharded_gradient']:.2f} | {r['activations']:.2f} | **{r['total']:.2f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
