"""Evaluation: the held-out loss during training, and greedy generation with exact match (SFT)."""

from __future__ import annotations

from typing import Any

import torch

from flashlm.data.chat import prompt_ids, reference_answer
from flashlm.data.packing import model_inputs


def batch_loss(model, batch: dict[str, Any], document_mask: bool, device, cp=None) -> torch.Tensor:
    """The loss of one data batch. With ``cp`` (a ``flashlm.parallel.ContextParallel``) the
    model sees this rank's shard of each sequence and the loss is rescaled so that its mean over
    all ranks is the token-weighted mean (``flashlm.parallel.group_loss``)."""
    inputs = model_inputs(batch, document_mask, device)
    if cp is None:
        return model(**inputs).loss
    from flashlm.parallel import group_loss, shard_batch

    inputs = shard_batch(inputs, cp)
    return group_loss(model(**inputs).loss, inputs["targets"], cp)


@torch.no_grad()
def evaluate(model, batches, accelerator, max_batches: int | None, document_mask: bool = False, cp=None) -> float:
    """Mean next-token loss over the held-out batches, averaged over all processes (``cp``: as
    in ``batch_loss``)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        loss = batch_loss(model, batch, document_mask, accelerator.device, cp)
        total += torch.stack([loss.double(), torch.ones((), device=total.device, dtype=torch.float64)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (EOS excluded) of token-id ``prompts`` by a ``flashlm.GPT``.

    Prompts of equal length are decoded together; no KV cache, so this is for short answers
    from small models (evaluation), not for serving.
    """
    model.eval()
    device = model.embed.weight.device
    outputs: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            idx = group[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in idx], device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                next_ids = model(ids).logits[:, -1].argmax(-1)
                done |= next_ids == eos_token_id
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                if done.all():
                    break
            for row, i in zip(ids[:, len(prompts[idx[0]]):].tolist(), idx):
                outputs[i] = row[:row.index(eos_token_id)] if eos_token_id in row else row
    return outputs


def exact_match(model, tokenizer, records: list[tuple[dict, str]], default_template: bool,
                max_new_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    """Share of ``records`` whose greedy answer equals the reference (whitespace-stripped), and
    one result dict per record: ``where``, ``prompt``, ``expected``, ``got``, ``correct``."""
    prompts = [prompt_ids(record, tokenizer, default_template) for record, _ in records]
    answers = greedy_generate(model, prompts, max_new_tokens, tokenizer.eos_token_id)
    results = []
    for (record, where), prompt, answer in zip(records, prompts, answers):
        got = tokenizer.decode(answer, skip_special_tokens=True).strip()
        expected = reference_answer(record).strip()
        results.append({"where": where, "prompt": tokenizer.decode(prompt), "expected": expected, "got": got,
                        "correct": got == expected})
    return sum(r["correct"] for r in results) / max(len(results), 1), results
