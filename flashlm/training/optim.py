"""The optimizer and the learning-rate schedule.

The learning rate is a pure function of the step (``lr_at``), so a checkpoint's step is the
scheduler's whole state.
"""

import math

import torch

from flashlm.recipe import Recipe, ScheduleConfig


def lr_at(step: int, lr: float, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup over ``warmup_steps`` (the first step already takes ``lr / warmup_steps``),
    then ``constant``; ``cosine`` down to ``min_lr_ratio * lr`` at the last step; or ``wsd``:
    constant until the last ``decay_fraction`` of the steps, then linear down to the minimum.
    """
    if step < schedule.warmup_steps:
        return lr * (step + 1) / schedule.warmup_steps
    min_lr = lr * schedule.min_lr_ratio
    if schedule.kind == "constant":
        return lr
    if schedule.kind == "cosine":
        span = max(total_steps - 1 - schedule.warmup_steps, 1)
        progress = min((step - schedule.warmup_steps) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    decay_steps = max(round(schedule.decay_fraction * total_steps), 1)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return lr
    progress = (step - decay_start + 1) / decay_steps
    return lr - (lr - min_lr) * progress


def build_optimizer(model: torch.nn.Module, cfg: Recipe, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, fused=fused
    )
