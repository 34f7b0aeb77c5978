import sys, json, random, torch, numpy as np
sys.path.insert(0, "scripts/eval")
import long_context as lc
from transformers import AutoTokenizer
from flashlm.training.checkpoint import load_model
# usage: PYTHONPATH=. python3 <this script> CORPUS_DIR RUN [RUN ...]  (CORPUS_DIR: built by scripts/run_ladder.py)
corpus, runs = sys.argv[1], sys.argv[2:]
tok = AutoTokenizer.from_pretrained(f"{corpus}/tokenizer")
text = "".join(json.loads(l)["text"] for l in open(f"{corpus}/eval.jsonl"))[:300000]
ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"])
for run in runs:
    model = load_model(run, attn_backend="sdpa", gradient_checkpointing=False, checkpoint_dtype=None, checkpoint_offload=False,
                       checkpoint_keep_attention=False, mlp_chunk_size=0, loss_chunk_size=0, loss_impl="chunked").eval()
    rng = random.Random(0); hits = np.zeros(8); n = 0
    for t in range(40):
        def filler(k):
            s = rng.randrange(len(ids) - k); return ids[s:s + k]
        value = rng.randint(10000, 99999)
        x, a0, ans = lc.retrieval_prompt(tok, filler, 256, lc.PASSKEY, [({"value": value}, rng.random())], {"value": value})
        with torch.no_grad():
            out = model(x[None]); lg = out.logits if hasattr(out, "logits") else out
        pred = lg[0, a0 - 1:a0 - 1 + len(ans)].argmax(-1).tolist()
        for i, (p, a) in enumerate(zip(pred, ans)): hits[i] += p == a
        n += 1
    print(run, "per answer token:", (hits[:len(ans)] / n).round(2), [tok.decode([a]) for a in ans])
