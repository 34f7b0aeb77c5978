"""How often a random_spans cue points at one place: for blocks of L tokens cut from the code
corpus's long training documents, a source at a random place in the first half and a copy at a
random later place, the share of sources whose first k tokens occur nowhere else in the block
before the copy. Run from the repository root after scripts/run_ladder.py built the corpus:

    PYTHONSAFEPATH=1 .venv/bin/python results/ladder/experiments/cue_uniqueness.py
"""
import json

import numpy as np
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(".cache/code_corpus/tokenizer")
docs = []
for line in open(".cache/code_corpus/train.jsonl"):
    t = json.loads(line)["text"]
    if len(t) > 600_000:
        docs.append(np.asarray(tok(t[:2_000_000], add_special_tokens=False)["input_ids"], dtype=np.int64))
    if len(docs) >= 6: break
print("docs", [len(d) for d in docs])
rng = np.random.default_rng(0)
for L in (256, 4096, 32768, 131072):
    res = {k: [] for k in (2, 4, 6, 8, 12)}
    for trial in range(300):
        d = docs[trial % len(docs)]
        if len(d) < L: continue
        s = rng.integers(0, len(d) - L); blk = d[s:s + L]
        p = rng.integers(0, L // 2); q = rng.integers(p + 48, L)  # source start, copy start
        for k in res:
            g = blk[p:p + k]
            win = np.lib.stride_tricks.sliding_window_view(blk[:q], k)
            hits = np.flatnonzero((win == g).all(1))
            res[k].append(len(hits) == 1)
    print(f"L={L:6d}", " ".join(f"k={k}: {np.mean(v):.0%}" for k, v in res.items()), flush=True)
