"""GPU acceptance checks for the flashlm model on a CUDA GPU (run on an H100).

1. The preset's forward and backward with ``attn_backend="flash"`` against ``"sdpa"`` in bf16
   autocast (fp32 weights, as training runs). Both are measured against an fp32 reference run of
   the same weights and inputs; flash passes when its error is at most twice SDPA's (plus a tiny
   floor) for the loss, the logits and every parameter gradient.
2. The model exported to a Hugging Face directory (bf16 weights, sharded) and loaded back by
   transformers and by flashlm: fp32 logits must agree closely, and in bf16 transformers running
   on flashlm's kernel (``attn_implementation=flashlm.HF_ATTN_IMPLEMENTATION``, with and without a
   padding mask) and flashlm on flash must be within twice transformers-SDPA's bf16 error.

Prints a table and writes JSON (the provenance block of ``scripts/provenance.py``, shapes,
every number) to ``--out``. Exits 1 if a check fails.

    python scripts/bench/gpu_check_model.py --out results/model/gpu_check_model.json
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import add_commit_argument, environment  # noqa: E402
from timing import cuda_median_ms  # noqa: E402

import flashlm
from flashlm import GPT, GPTConfig
from flashlm.hf import load_pretrained, save_pretrained

FACTOR, FLOOR = 2.0, 1e-6  # flash error <= FACTOR * sdpa error + FLOOR


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in fp64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def forward_backward(model, input_ids, backend, bf16):
    model.config.attn_backend = backend
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids, labels=input_ids)
    out.loss.backward()
    return out.loss.detach().float(), out.logits.detach().float()


def check_training_step(args):
    """Check 1: flash vs sdpa forward+backward of the preset in bf16 autocast."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset)
    with torch.device("cuda"):
        model = GPT(config)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device="cuda")

    ref_loss, ref_logits = forward_backward(model, input_ids, "sdpa", bf16=False)
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    runs = {}
    for backend in ("sdpa", "flash"):
        torch.cuda.reset_peak_memory_stats()
        loss, logits = forward_backward(model, input_ids, backend, bf16=True)
        runs[backend] = {
            "loss_abs_err": abs(loss.item() - ref_loss.item()),
            "logits_rel_err": rel_err(logits, ref_logits),
            "grad_rel_err": {n: rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters()},
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "fwd_bwd_ms": cuda_median_ms(lambda b=backend: forward_backward(model, input_ids, b, bf16=True)),
        }
    flash, sdpa = runs["flash"], runs["sdpa"]
    ok = {
        "loss": flash["loss_abs_err"] <= FACTOR * sdpa["loss_abs_err"] + FLOOR,
        "logits": flash["logits_rel_err"] <= FACTOR * sdpa["logits_rel_err"] + FLOOR,
        "grads": all(flash["grad_rel_err"][n] <= FACTOR * sdpa["grad_rel_err"][n] + FLOOR for n in ref_grads),
    }
    model.zero_grad(set_to_none=True)
    worst = sorted(ref_grads, key=lambda n: flash["grad_rel_err"][n] / (sdpa["grad_rel_err"][n] + FLOOR))[-3:]
    print(f"\n[1] {args.preset} forward+backward, bf16 autocast, batch {args.batch} x seq {args.seq_len}; "
          f"errors against an fp32 sdpa run; pass if flash <= {FACTOR} x sdpa + {FLOOR}")
    print(f"  {'quantity':<44} {'sdpa':>12} {'flash':>12}  ok")
    print(f"  {'loss abs err (ref ' + f'{ref_loss.item():.4f})':<44} {sdpa['loss_abs_err']:>12.3e} "
          f"{flash['loss_abs_err']:>12.3e}  {ok['loss']}")
    print(f"  {'logits rel err':<44} {sdpa['logits_rel_err']:>12.3e} {flash['logits_rel_err']:>12.3e}  {ok['logits']}")
    for n in reversed(worst):
        print(f"  {'grad rel err ' + n:<44} {sdpa['grad_rel_err'][n]:>12.3e} {flash['grad_rel_err'][n]:>12.3e}")
    print(f"  {'all ' + str(len(ref_grads)) + ' gradients':<44} {'':>12} {'':>12}  {ok['grads']}")
    print(f"  {'fwd+bwd ms (median of 5)':<44} {sdpa['fwd_bwd_ms']:>12.1f} {flash['fwd_bwd_ms']:>12.1f}")
    print(f"  {'peak memory GiB':<44} {sdpa['peak_memory_gib']:>12.2f} {flash['peak_memory_gib']:>12.2f}")
    return model, {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "ref_loss": ref_loss.item(),
                   "runs": runs, "passed": ok}


def check_export(model, args):
    """Check 2: the exported checkpoint through transformers against flashlm."""
    from transformers import AutoModelForCausalLM

    workdir = Path(tempfile.mkdtemp(prefix="flashlm_gpu_check_", dir=args.workdir))
    start = time.perf_counter()
    save_pretrained(model, workdir, dtype=torch.bfloat16, max_shard_size="1GB")
    export_s = time.perf_counter() - start
    shards = sorted(p.name for p in workdir.glob("*.safetensors"))
    del model
    torch.cuda.empty_cache()

    torch.manual_seed(1)
    config = GPTConfig.from_preset(args.preset)
    input_ids = torch.randint(0, config.vocab_size, (2, args.export_seq_len), device="cuda")
    padding = torch.ones_like(input_ids)
    padding[0, : args.export_seq_len // 4] = 0
    valid = padding.bool()

    def logits(m, **kwargs):
        with torch.no_grad():
            return m(input_ids, **kwargs).logits.float()

    ours = load_pretrained(workdir, attn_backend="sdpa").cuda().eval()
    hf_fp32 = AutoModelForCausalLM.from_pretrained(workdir, dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
    ref = logits(hf_fp32)
    ref_padded = logits(hf_fp32, attention_mask=padding)[valid]
    fp32_err = rel_err(logits(ours), ref)
    del hf_fp32
    ours = ours.to(torch.bfloat16)
    ours.config.attn_backend = "flash"
    errs = {"flashlm flash bf16": rel_err(logits(ours), ref)}
    del ours
    for name, impl in (("transformers sdpa bf16", "sdpa"), ("transformers flm_triton bf16", flashlm.HF_ATTN_IMPLEMENTATION)):
        hf = AutoModelForCausalLM.from_pretrained(workdir, dtype=torch.bfloat16, attn_implementation=impl).cuda().eval()
        errs[name] = rel_err(logits(hf), ref)
        errs[name + " padded"] = rel_err(logits(hf, attention_mask=padding)[valid], ref_padded)
        del hf
    base, base_padded = errs["transformers sdpa bf16"], errs["transformers sdpa bf16 padded"]
    ok = {
        "fp32 transformers vs flashlm": fp32_err <= 1e-5,
        "flashlm flash bf16": errs["flashlm flash bf16"] <= FACTOR * base + FLOOR,
        "transformers flm_triton bf16": errs["transformers flm_triton bf16"] <= FACTOR * base + FLOOR,
        "transformers flm_triton bf16 padded": errs["transformers flm_triton bf16 padded"] <= FACTOR * base_padded + FLOOR,
    }
    print(f"\n[2] export of {args.preset} (bf16 weights, {len(shards)} shards, {export_s:.1f}s) -> transformers and "
          f"flashlm, batch 2 x seq {args.export_seq_len}; rel err of logits against transformers fp32 sdpa")
    print(f"  {'fp32 flashlm vs transformers':<44} {fp32_err:>12.3e}  {ok['fp32 transformers vs flashlm']} (<= 1e-5)")
    for name, err in errs.items():
        print(f"  {name:<44} {err:>12.3e}  {ok.get(name, '(baseline)')}")
    if not args.keep_export:
        shutil.rmtree(workdir)
    return {"export_seq_len": args.export_seq_len, "shards": shards, "export_seconds": export_s,
            "fp32_rel_err": fp32_err, "bf16_rel_err": errs, "passed": ok,
            "directory": str(workdir) if args.keep_export else None}


def main(args):
    if not torch.cuda.is_available():
        raise SystemExit("scripts/bench/gpu_check_model.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    env = environment("cuda", commit=args.commit)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    model, training = check_training_step(args)
    export = check_export(model, args)
    passed = all(training["passed"].values()) and all(export["passed"].values())
    results = {"environment": env, "factor": FACTOR, "floor": FLOOR, "training_step": training, "export": export,
               "passed": passed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'PASSED' if passed else 'FAILED'}; results in {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--export-seq-len", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where to write the export (default: the temp dir)")
    parser.add_argument("--keep-export", action="store_true", help="keep the exported directory")
    add_commit_argument(parser)
    sys.exit(main(parser.parse_args()))
