import sys, json, torch, numpy as np
import torch.nn.functional as F
from transformers import AutoTokenizer
from flashlm.training.checkpoint import load_model
from flashlm.data.retrieval import _copy_spans
# usage: PYTHONPATH=. python3 <this script> CORPUS_DIR RUN [RUN ...]  (CORPUS_DIR: built by scripts/run_ladder.py)
corpus, runs = sys.argv[1], sys.argv[2:]
tok = AutoTokenizer.from_pretrained(f"{corpus}/tokenizer")
text = "".join(json.loads(l)["text"] for l in open(f"{corpus}/eval.jsonl"))[:400000]
ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"])
rng = np.random.default_rng(1)
for run in runs:
    model = load_model(run, attn_backend="sdpa", gradient_checkpointing=False, checkpoint_dtype=None, checkpoint_offload=False,
                       checkpoint_keep_attention=False, mlp_chunk_size=0, loss_chunk_size=0, loss_impl="chunked").eval()
    hit = tot = 0; hit_plain = 0
    for b in range(64):
        s = int(rng.integers(0, len(ids) - 256)); block = ids[s:s + 256].copy(); orig = block.copy()
        _copy_spans(block, 0, 256, rng)
        mask = block != orig
        x = torch.tensor(block)[None]
        with torch.no_grad():
            out = model(x); lg = out.logits if hasattr(out, "logits") else out
        pred = lg[0, :-1].argmax(-1).numpy(); tgt = block[1:]
        m = mask[1:].copy()
        # skip each copy's first 4 tokens (the model has to notice the copy first)
        idx = np.flatnonzero(m); starts = idx[np.append(True, np.diff(idx) > 1)]
        for st in starts: m[st:st + 4] = False
        hit += (pred[m] == tgt[m]).sum(); tot += m.sum()
        # the same positions in the original text
        xo = torch.tensor(orig)[None]
        with torch.no_grad():
            out = model(xo); lo = out.logits if hasattr(out, "logits") else out
        hit_plain += (lo[0, :-1].argmax(-1).numpy()[m] == orig[1:][m]).sum()
    print(f"{run}: top-1 on copied tokens (after the 4th) {hit/tot:.0%} of {tot}; on the original text there {hit_plain/tot:.0%}")
