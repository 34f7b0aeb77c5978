import sys, torch
from flashlm.training.checkpoint import load_model
import torch.nn.functional as F
run = sys.argv[1]
model = load_model(run, attn_backend="sdpa", gradient_checkpointing=False, checkpoint_dtype=None, checkpoint_offload=False,
                   checkpoint_keep_attention=False, mlp_chunk_size=0, loss_chunk_size=0, loss_impl="chunked").eval()
g = torch.Generator().manual_seed(0)
x = torch.randint(100, model.config.vocab_size, (16, 60), generator=g)
ids = torch.cat([x, x], 1)
with torch.no_grad():
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(16, -1)
acc = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float()
print(f"{run}: loss first half {lp[:, :59].mean():.2f}, second half {lp[:, 60:].mean():.2f}; top-1 second half {acc[:, 60:].mean():.0%}")
