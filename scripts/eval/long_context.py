"""Long-context evaluation: perplexity by position bucket on held-out long documents, and
passkey retrieval at a given length.

Perplexity: the held-out token stream is cut into windows of ``--seq-len`` tokens; each token's
next-token loss is averaged into buckets of position (``[0, L/2^(n-1)), ..., [L/2, L)``): a model
that uses its long context has lower loss late in the window than early, and one that breaks
past its trained length has higher.

Passkey: a five-digit key is hidden at a depth (0 = start, 1 = end) in a haystack of held-out
text, and the window ends with a question whose answer is the key::

    <intro> <text> The pass key is 12345. Remember it: 12345. <text> What is the pass key? The pass key is 12345

All of it is exactly ``--seq-len`` tokens. The model reads it once; a trial is correct when
the argmax at every answer position is the answer token: the same as greedy decoding
reproducing the key, without the decoding loop.

Held-out text: by default the documents the run held out (its recipe's eval split, rebuilt
from the token cache, so no ``datasets`` install is needed when the cache exists),
concatenated in corpus order; or ``--data`` (jsonl with a "text" field, or text files, one
document per file, read as training reads them), whose documents are concatenated in file order.

    PYTHONPATH=. python3 scripts/eval/long_context.py --model runs/longctx/128k --seq-len 131072
    PYTHONPATH=. python3 scripts/eval/long_context.py --model runs/longctx/8k/hf --seq-len 8192 \\
        --tokenizer data/tokenizer --data data/corpus/austen_persuasion.jsonl

Writes a JSON report (``--out``; default ``<model>/long_context_<seq_len>.json``, with the
provenance block of ``scripts/provenance.py``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import environment  # noqa: E402

INTRO = ("Somewhere in the long text below there is a pass key. Find it and keep it in mind; "
         "you will be asked for it.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it: {key}.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


def load_model(path, device, mlp_chunk_size):
    """A flashlm run directory or checkpoint, or a Hugging Face directory, ready for inference."""
    from flashlm.training.checkpoint import load_model as load

    try:
        model = load(path, attn_backend="auto", gradient_checkpointing=False, checkpoint_dtype=None,
                     checkpoint_offload=False, mlp_chunk_size=mlp_chunk_size, loss_chunk_size=4096,
                     loss_impl="chunked")
    except FileNotFoundError as e:
        raise SystemExit(f"--model: {e}") from None
    return model.to(device).eval()


def run_recipe(path):
    """The resolved recipe of a run directory or checkpoint, or None for other models."""
    from flashlm.recipe import recipe_from_dict
    from flashlm.training.checkpoint import is_checkpoint, read_recipe, resolve_checkpoint

    if not is_checkpoint(path):
        return None
    return recipe_from_dict(read_recipe(resolve_checkpoint(path)))


def held_out_tokens(args, tokenizer, recipe):
    """One int64 token stream of held-out documents (each ending in EOS)."""
    import numpy as np

    if args.data is None:
        from flashlm.data.documents import load_or_tokenize
        from flashlm.data.packing import split_documents

        if recipe is None:
            raise SystemExit("--data is required for a model that is not a flashlm run (no recipe to find "
                             "its held-out documents)")
        docs, _, _ = load_or_tokenize(recipe.data, tokenizer)
        _, held_out = split_documents(docs.n_docs, recipe.data)
        if len(held_out) == 0:
            raise SystemExit(f"the run holds out no documents (data.eval_fraction={recipe.data.eval_fraction}); "
                             "pass --data")
        pieces = [np.asarray(docs.tokens[docs.offsets[i]:docs.offsets[i + 1]]) for i in held_out]
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64))
    from flashlm.data import DataError, iter_texts

    ids = []
    try:
        for text in iter_texts(args.data):
            doc = tokenizer(text, add_special_tokens=True)["input_ids"]
            ids += doc + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    except DataError as e:
        raise SystemExit(f"--data: {e}") from None
    return torch.tensor(ids, dtype=torch.int64)


class FinalHidden:
    """Captures the model's final normalized hidden states (a forward hook on ``model.norm``)
    so that logits are computed only where they are needed."""

    def __init__(self, model):
        self.value = None
        self._handle = model.norm.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.value = output

    def close(self):
        self._handle.remove()


def forward_hidden(model, ids, capture, autocast):
    """Final hidden states (1, S, hidden) of one window; the chunked loss path keeps the full
    logits from ever existing."""
    with torch.no_grad(), autocast:
        model(ids, labels=ids)
    return capture.value


def token_losses(model, hidden, targets, chunk=4096):
    """Next-token losses (S - 1,) fp32 from hidden states (S, hidden), ``chunk`` rows of logits at a time."""
    weight = model.lm_head.weight
    out = []
    for start in range(0, len(targets), chunk):
        logits = (hidden[start:start + chunk].to(weight.dtype) @ weight.T).float()
        out.append(torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="none"))
    return torch.cat(out)


def bucket_edges(seq_len, buckets):
    """Bucket boundaries by position: [0, L/2^(n-1), ..., L/2, L]; fewer when L is small."""
    edges = sorted({seq_len >> k for k in range(buckets - 1, 0, -1)} - {0})
    return [0, *edges, seq_len]


def perplexity_by_position(model, stream, args, capture, autocast, device):
    seq_len = args.seq_len
    windows = min(args.windows, len(stream) // seq_len)
    if windows == 0:
        raise SystemExit(f"the held-out text holds {len(stream)} tokens, fewer than one window of {seq_len}; "
                         "pass --data with longer documents")
    edges = bucket_edges(seq_len, args.buckets)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
    for w in range(windows):
        ids = stream[w * seq_len:(w + 1) * seq_len][None].to(device)
        hidden = forward_hidden(model, ids, capture, autocast)[0, :-1]
        losses = token_losses(model, hidden, ids[0, 1:]).double().cpu()
        for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
            part = losses[lo:min(hi, seq_len - 1)]
            sums[b] += part.sum()
            counts[b] += len(part)
    buckets = []
    for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
        loss = (sums[b] / counts[b]).item() if counts[b] else float("nan")
        buckets.append({"start": lo, "end": hi, "tokens": int(counts[b]), "loss": loss,
                        "ppl": math.exp(min(loss, 50.0))})
    total = (sums.sum() / counts.sum()).item()
    return {"windows": windows, "tokens": int(counts.sum()), "loss": total, "ppl": math.exp(min(total, 50.0)),
            "buckets": buckets}


def passkey_prompt(tokenizer, stream, seq_len, key, depth, offset):
    """(input ids (seq_len,), answer start, answer ids): haystack from ``stream`` at ``offset``."""
    def encode(text, first=False):
        # The prompt opens like a training document: with the tokenizer's own special tokens.
        return tokenizer(text, add_special_tokens=first)["input_ids"]

    intro, needle = encode(INTRO, first=True), encode(NEEDLE.format(key=key))
    question, answer = encode(QUESTION), encode(ANSWER.format(key=key))
    filler_len = seq_len - len(intro) - len(needle) - len(question) - len(answer)
    if filler_len < 1:
        raise SystemExit(f"--seq-len {seq_len} is too short for a passkey prompt")
    filler = stream.roll(-offset)[:filler_len].tolist()
    at = round(depth * filler_len)
    ids = intro + filler[:at] + needle + filler[at:] + question + answer
    return torch.tensor(ids, dtype=torch.int64), len(ids) - len(answer), answer


def passkey(model, tokenizer, stream, args, capture, autocast, device):
    rng = random.Random(args.seed)
    trials = []
    for i in range(args.passkey_trials):
        depth = i / (args.passkey_trials - 1) if args.passkey_trials > 1 else 0.5
        key = rng.randint(10000, 99999)
        offset = rng.randrange(len(stream))
        ids, start, answer = passkey_prompt(tokenizer, stream, args.seq_len, key, depth, offset)
        hidden = forward_hidden(model, ids[None].to(device), capture, autocast)[0]
        # The token at position p predicts p + 1: the answer is predicted from start - 1 on.
        picked = hidden[start - 1:start - 1 + len(answer)]
        predicted = (picked.to(model.lm_head.weight.dtype) @ model.lm_head.weight.T).argmax(-1).tolist()
        hits = [p == a for p, a in zip(predicted, answer)]
        trials.append({"depth": depth, "key": key, "correct": all(hits), "token_accuracy": sum(hits) / len(hits),
                       "predicted": tokenizer.decode(predicted)})
    return {"trials": trials, "accuracy": sum(t["correct"] for t in trials) / len(trials),
            "token_accuracy": sum(t["token_accuracy"] for t in trials) / len(trials)}


def main(args):
    from flashlm.data import load_tokenizer
    from flashlm.training.checkpoint import source_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = run_recipe(args.model)
    tokenizer_path = args.tokenizer or source_tokenizer(args.model)
    if tokenizer_path is None:
        raise SystemExit(f"--model {args.model} carries no tokenizer; pass --tokenizer")
    tokenizer = load_tokenizer(str(tokenizer_path))
    model = load_model(args.model, device, args.mlp_chunk_size)
    use_autocast = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast)
    stream = held_out_tokens(args, tokenizer, recipe)
    capture = FinalHidden(model)
    start = time.perf_counter()
    report = {"model": str(args.model), "seq_len": args.seq_len, "rope_theta": model.config.rope_theta,
              "rope_scaling": model.config.rope_scaling,
              "max_position_embeddings": model.config.max_position_embeddings,
              "held_out_tokens": len(stream), "data": args.data or "the run's held-out documents",
              "autocast": "bf16" if use_autocast else "none", "device": str(device),
              "environment": environment(device)}
    report["perplexity"] = perplexity_by_position(model, stream, args, capture, autocast, device)
    report["passkey"] = passkey(model, tokenizer, stream, args, capture, autocast, device)
    report["seconds"] = time.perf_counter() - start
    capture.close()
    out = Path(args.out) if args.out else Path(args.model) / f"long_context_{args.seq_len}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    print(f"wrote {out}")
    return report


def summary(report):
    p, k = report["perplexity"], report["passkey"]
    lines = [f"{report['model']} at {report['seq_len']} tokens (rope_theta {report['rope_theta']:g}): "
             f"loss {p['loss']:.3f}, ppl {p['ppl']:.2f} over {p['windows']} window(s); "
             f"passkey {k['accuracy']:.0%} exact ({k['token_accuracy']:.0%} of answer tokens) "
             f"over {len(k['trials'])} trials", "", "| positions | tokens | loss | ppl |", "|---|---|---|---|"]
    for b in p["buckets"]:
        lines.append(f"| {b['start']}-{b['end']} | {b['tokens']} | {b['loss']:.3f} | {b['ppl']:.2f} |")
    lines += ["", "| depth | key | predicted | correct |", "|---|---|---|---|"]
    for t in k["trials"]:
        correct = "yes" if t["correct"] else "no"
        lines.append(f"| {t['depth']:.2f} | {t['key']} | {t['predicted'].strip()!r} | {correct} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="flashlm run directory or checkpoint, or a Hugging Face directory")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--tokenizer", help="default: the run's recipe's tokenizer, or the Hugging Face directory")
    p.add_argument("--data", help="held-out documents (jsonl, text files, folder or glob); "
                                  "default: the run's eval split")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows, at most")
    p.add_argument("--buckets", type=int, default=8, help="position buckets, halving towards the start")
    p.add_argument("--passkey-trials", type=int, default=10, help="keys at depths evenly spread over 0..1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--mlp-chunk-size", type=int, default=16384, help="tokens per MLP chunk (memory); 0: whole")
    p.add_argument("--out", help="JSON report path")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
