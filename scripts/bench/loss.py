"""LM head + cross-entropy without the logits: flashlm's chunked loss against liger-kernel's fused
linear cross-entropy, and the plain full-logits loss, in one run on the same inputs.

flashlm's chunked loss runs each chunk's softmax, loss and gradient as one Triton kernel on CUDA
(``flashlm.kernels.cross_entropy``); the "PyTorch softmax" row is the same chunk loop with those
steps as PyTorch elementwise ops (``fused=False``, the path CPUs take), to show what the kernel buys.

Each case is what a training step does at the top of the model: hidden states (tokens, hidden)
in fp32 (the residual stream under bf16 autocast over fp32 weights), the LM head (vocab,
hidden) in fp32, the matmuls under bf16 autocast, then backward to both. Reported: forward +
backward time (median of ``triton.testing.do_bench``), peak memory above the inputs
(``max_memory_allocated``), and the loss and gradient differences to the full-logits loss,
which is also the peer a plain Hugging Face model runs.

    PYTHONPATH=. python3 scripts/bench/loss.py --out results/loss

Writes ``loss.json`` (the provenance block of ``scripts/provenance.py``, every row) and
``loss.md`` to ``--out``. Needs CUDA; liger-kernel is optional (its
rows say "not installed" without it).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import add_commit_argument, describe, environment  # noqa: E402

from flashlm.model.loss import IGNORE_INDEX, chunked_linear_cross_entropy

# The 1b model's hidden size first: its long-context cases decide the choice.
SHAPES = [(hidden, tokens) for hidden in (2048, 768) for tokens in (131072, 32768, 8192)]
CHUNKS = (2048, 4096, 8192)
VOCAB = 32000


def providers():
    """name -> loss function (hidden, weight, targets); liger only when installed."""
    out = {"full logits": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, ignore_index=IGNORE_INDEX)}
    for chunk in CHUNKS:
        out[f"flashlm chunk {chunk}"] = lambda h, w, t, chunk=chunk: chunked_linear_cross_entropy(h, w, t, chunk)
    out["flashlm chunk 4096, PyTorch softmax"] = lambda h, w, t: chunked_linear_cross_entropy(h, w, t, 4096, fused=False)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        out["liger"] = None
    else:
        out["liger"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX)
    return out


def run_case(fn, hidden, weight, targets):
    """(ms, peak GiB above the inputs, loss, grad_hidden, grad_weight) of forward + backward."""
    import triton.testing

    def step():
        hidden.grad, weight.grad = None, None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets)
        loss.backward()
        return loss

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    grads = hidden.grad.clone(), weight.grad.clone()
    ms = triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
    return ms, peak, loss.item(), *grads


def bench(on_row, device="cuda"):
    rows = []
    for hidden_size, tokens in SHAPES:
        gen = torch.Generator(device=device).manual_seed(tokens + hidden_size)
        hidden = torch.randn(tokens, hidden_size, device=device, generator=gen).requires_grad_()
        weight = (torch.randn(VOCAB, hidden_size, device=device, generator=gen) * 0.02).requires_grad_()
        targets = torch.randint(0, VOCAB, (tokens,), device=device, generator=gen)
        targets[::97] = IGNORE_INDEX
        reference = None
        for name, fn in providers().items():
            row = {"hidden": hidden_size, "tokens": tokens, "vocab": VOCAB, "provider": name}
            if fn is None:
                row["error"] = "not installed"
            else:
                try:
                    ms, peak, loss, grad_h, grad_w = run_case(fn, hidden, weight, targets)
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                else:
                    row.update(ms=ms, peak_gib=peak, loss=loss, tokens_per_ms=tokens / ms)
                    if name == "full logits":
                        reference = loss, grad_h, grad_w
                    elif reference is not None:
                        row["loss_diff"] = abs(loss - reference[0])
                        row["grad_hidden_rel"] = ((grad_h - reference[1]).norm() / reference[1].norm()).item()
                        row["grad_weight_rel"] = ((grad_w - reference[2]).norm() / reference[2].norm()).item()
                    del grad_h, grad_w
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            on_row(rows)
        del hidden, weight, reference
        torch.cuda.empty_cache()
    return rows


def markdown(rows, env):
    lines = [f"LM head + cross-entropy, forward + backward, {describe(env, 'liger_kernel')}.", "",
             f"Vocab {VOCAB}, fp32 hidden states and LM head, matmuls under bf16 autocast. Peak: memory above "
             "the inputs. Differences are to the full-logits loss (relative norm for gradients).", "",
             "| hidden | tokens | provider | ms | peak GiB | loss diff | grad hidden | grad weight |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['hidden']} | {r['tokens'] // 1024}K | {r['provider']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | - | - | - | - |")
            continue
        diffs = (f"{r['loss_diff']:.1e} | {r['grad_hidden_rel']:.1e} | {r['grad_weight_rel']:.1e}"
                 if "loss_diff" in r else "- | - | -")
        lines.append(f"{head} {r['ms']:.2f} | {r['peak_gib']:.2f} | {diffs} |")
    return "\n".join(lines) + "\n"


def main(args):
    if not torch.cuda.is_available():
        sys.exit("scripts/bench/loss.py needs a CUDA GPU")
    env = environment("cuda", commit=args.commit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows):  # after every case, so a run cut short keeps what it measured
        (out / "loss.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (out / "loss.md").write_text(markdown(rows, env))

    rows = bench(write)
    print(markdown(rows, env))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/loss")
    add_commit_argument(parser)
    main(parser.parse_args())
