"""Document masking and sliding windows in flashlm.GPT on CPU (flash under the Triton interpreter):
packed documents against running each document alone, windows against an explicitly masked
reference, cu_seqlens validation, a window model exported to transformers' Mistral, and a
pretraining run with ``training.document_mask``.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import DEVICE
from flashlm import GPT, GPTConfig
from flashlm.data import make_batch
from flashlm.hf import load_pretrained, save_pretrained
from flashlm.model.model import attention, build_attention_mask, check_cu_seqlens

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
BACKENDS = ["eager", "sdpa", "flash"]
# Two rows of 20 tokens: documents of 7, 1, 0 (empty) and 12 tokens, then 13 and 7.
CU_SEQLENS = [0, 7, 8, 8, 20, 33, 40]


def tiny(**overrides):
    return GPTConfig(**{**TINY, **overrides})


def documents(cu):
    return [(a, b) for a, b in zip(cu, cu[1:]) if b > a]


def masked_reference(q, k, v, window=None, cu=None):
    """fp64 attention with the mask written out: causal, within a document, inside the window."""
    batch, seqlen, heads, head_dim = q.shape
    q, k, v = q.double(), k.double(), v.double()
    k, v = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    visible = (j <= i)[None].expand(batch, -1, -1)
    if window is not None:
        visible = visible & (i - j < window)
    if cu is not None:
        doc = torch.bucketize(torch.arange(batch * seqlen), torch.tensor(cu[1:]), right=True).view(batch, seqlen)
        visible = visible & (doc[:, :, None] == doc[:, None, :])
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


# --- document masking -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_document_mask_equals_each_document_alone(backend):
    """Packed rows with cu_seqlens give every document the logits and gradients it gets alone
    (positions restarting at 0), ragged and empty documents included."""
    torch.manual_seed(0)
    model = GPT(tiny(num_hidden_layers=1, attn_backend=backend)).to(DEVICE)
    input_ids = torch.randint(0, 96, (2, 20), device=DEVICE)
    weights = torch.randn(40, 96, device=DEVICE)  # a loss that reads every logit
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32)

    packed = model(input_ids, cu_seqlens=cu).logits.reshape(40, 96)
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    flat = input_ids.reshape(-1)
    alone = torch.cat([model(flat[a:b][None]).logits[0] for a, b in documents(CU_SEQLENS)])
    (alone * weights).sum().backward()

    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_data_batches_carry_what_the_model_derives():
    """A flashlm.data batch's position_ids are the per-document positions the model would derive
    from its cu_seqlens, and its doc_ids split the rows where cu_seqlens does."""
    blocks = torch.randint(0, 96, (2, 20)).numpy()
    starts = torch.zeros(2, 20, dtype=torch.bool)
    for s in CU_SEQLENS[:-1]:
        starts[s // 20, s % 20] = True
    batch = make_batch(blocks, starts.numpy())
    assert batch["cu_seqlens"].tolist() == [0, 7, 8, 20, 33, 40]  # an empty document is no segment
    assert batch["max_seqlen"] == 13
    torch.manual_seed(0)
    model = GPT(tiny(attn_backend="sdpa"))
    derived = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).logits
    given = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                  max_seqlen=batch["max_seqlen"]).logits
    torch.testing.assert_close(given, derived, rtol=0, atol=0)


# --- sliding window -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window, cu", [(1, None), (5, None), (5, CU_SEQLENS), (64, CU_SEQLENS)],
                         ids=["w1", "w5", "w5-docs", "w64-docs"])
def test_window_and_documents_match_masked_reference(backend, window, cu):
    """attention() with a window (and documents) against the mask written out, in fp32 against fp64."""
    torch.manual_seed(0)
    q = torch.randn(2, 20, 4, 16, device=DEVICE)
    k, v = torch.randn(2, 2, 20, 2, 16, device=DEVICE)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    mask = build_attention_mask(backend, 2, 20, q.device, window, cu_t)
    out = attention(q, k, v, backend, mask)
    ref = masked_reference(q.cpu(), k.cpu(), v.cpu(), window, cu).to(out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_window_bounds_the_receptive_field():
    """With window W and L layers, the output at position t reads tokens t - L * (W - 1) .. t only;
    a window as long as the sequence is plain causal attention."""
    torch.manual_seed(0)
    model = GPT(tiny(attn_backend="sdpa", sliding_window=4))
    ids = torch.randint(0, 96, (1, 24))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 96
    a, b = model(ids).logits, model(changed).logits
    reach = 2 * (4 - 1)  # 2 layers
    assert (a[0, :reach + 1] - b[0, :reach + 1]).abs().amax(-1).min() > 0
    torch.testing.assert_close(a[0, reach + 1:], b[0, reach + 1:], rtol=0, atol=0)
    model.config.sliding_window = 24
    full = GPT(tiny(attn_backend="sdpa"))
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids).logits, full(ids).logits, rtol=1e-6, atol=1e-6)


def test_window_training_run_matches_reference_step_by_step():
    """A few AdamW steps of a window model on packed documents: flash tracks eager."""
    losses = {}
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    for backend in ("eager", "flash"):
        torch.manual_seed(0)
        model = GPT(tiny(num_hidden_layers=1, attn_backend=backend, sliding_window=6)).to(DEVICE)
        batch = torch.randint(0, 96, (2, 20), device=DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(3):
            loss = model(batch, labels=batch, cu_seqlens=cu).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]
    torch.testing.assert_close(losses["flash"], losses["eager"], rtol=1e-5, atol=0)


def test_flops_per_token_counts_the_window():
    windowed, full = GPT(tiny(sliding_window=8)), GPT(tiny())
    per_key = 12 * 2 * 4 * 16  # 12 * layers * heads * head_dim: forward + backward FLOPs per key seen
    assert windowed.flops_per_token(8) == full.flops_per_token(8)  # a window >= seq_len is plain causal
    seen = 8 - 8 * 7 / (2 * 64)  # average keys a query sees at seq_len 64, instead of 64 / 2
    assert windowed.flops_per_token(64) - full.flops_per_token(64) == pytest.approx(per_key * (seen - 32))


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("cu, kwargs, message", [
    ([0, 9, 7, 20, 40], {}, "is not monotone: cu_seqlens[2]=7 is below cu_seqlens[1]=9"),
    ([0, 7, 20, 39], {}, "must start at 0 and end at batch * seqlen = 2 * 20 = 40"),
    ([1, 7, 20, 40], {}, "must start at 0"),
    ([0, 7, 25, 40], {}, "spans rows 0 and 1: every row start b * seqlen (here 20)"),
    ([0, 7, 20, 40], {"max_seqlen": 12}, "max_seqlen=12 is below the longest document in cu_seqlens (20 tokens)"),
    (torch.tensor([0, 20, 40]), {}, "must be a 1-D int32 tensor of document offsets, got a 1-D torch.int64 tensor"),
    (torch.tensor([[0, 20, 40]], dtype=torch.int32), {}, "got a 2-D torch.int32 tensor"),
], ids=["not-monotone", "wrong-end", "wrong-start", "crosses-rows", "max-seqlen", "int64", "2d"])
def test_bad_cu_seqlens_are_clear_errors(cu, kwargs, message):
    model = GPT(tiny(attn_backend="sdpa"))
    cu = cu if isinstance(cu, torch.Tensor) else torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(2, 20, dtype=torch.long), cu_seqlens=cu, **kwargs)
    assert message in str(info.value)


def test_check_cu_seqlens_accepts_empty_documents():
    cu = check_cu_seqlens(torch.tensor(CU_SEQLENS, dtype=torch.int32), 2, 20, max_seqlen=13)
    assert cu.device.type == "cpu" and cu.tolist() == CU_SEQLENS


@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_bad_sliding_window_is_named(value):
    with pytest.raises(ValueError, match=r"GPTConfig.sliding_window=.* is invalid"):
        tiny(sliding_window=value)


# --- export ---------------------------------------------------------------------------------

def test_window_model_exports_to_mistral_with_matching_logits(tmp_path):
    """A sliding-window model is written as MistralForCausalLM; transformers' fp32 logits match
    flashlm's on sequences longer than the window, and the directory imports back with its window."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = GPT(tiny(attn_backend="sdpa", sliding_window=5)).eval()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 5
    assert not {"attention_bias", "mlp_bias", "pretraining_tp"} & set(config)
    ids = torch.randint(0, 96, (2, 33))
    with torch.no_grad():
        ours = model(ids).logits
        for implementation in ("eager", "sdpa"):
            theirs = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
            assert type(theirs).__name__ == "MistralForCausalLM"
            torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-4, atol=1e-4)
        back = load_pretrained(tmp_path, attn_backend="eager")
        assert back.config.sliding_window == 5
        torch.testing.assert_close(back(ids).logits, ours, rtol=1e-4, atol=1e-4)
        model.config.sliding_window = None  # the window matters at this length
        assert (model(ids).logits - ours).abs().max() > 1e-2


# --- training loop --------------------------------------------------------------------------

def test_pretraining_recipe_with_document_mask(tmp_path):
    """training.document_mask sends the batches' boundaries and positions to the model: the run
    trains, and its first loss differs from the same run attending across documents."""
    from flashlm.recipe import recipe_from_dict
    from flashlm.training.train import main

    corpus = tmp_path / "corpus.jsonl"
    lines = (REPO / "data" / "corpus" / "austen_persuasion.jsonl").read_text(encoding="utf-8").splitlines()
    corpus.write_text("".join(json.dumps({"text": json.loads(x)["text"][:300]}) + "\n" for x in lines))
    first_losses = {}
    for document_mask in (True, False):
        recipe = {
            "output_dir": str(tmp_path / f"run_{document_mask}"),
            "model": {"preset": "debug", "vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                      "attn_backend": "sdpa"},
            "data": {"path": str(corpus), "tokenizer": str(REPO / "data" / "tokenizer"), "eval_docs": 3,
                     "cache_dir": str(tmp_path / "cache")},
            "optim": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 1.0},
            "schedule": {"kind": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0},
            "training": {"steps": 3, "micro_batch_size": 4, "grad_accum_steps": 1, "seq_len": 64, "seed": 0,
                         "cpu": True, "mixed_precision": "no", "document_mask": document_mask},
            "logging": {"progress_bar": False},
        }
        summary = main(recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe))))
        assert summary["eval_loss"] < 9
        records = [json.loads(x) for x in (tmp_path / f"run_{document_mask}" / "metrics.jsonl").read_text().splitlines()]
        first_losses[document_mask] = next(r["loss"] for r in records if "loss" in r)
    assert first_losses[True] != pytest.approx(first_losses[False], abs=1e-4)
