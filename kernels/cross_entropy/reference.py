"""Pure-PyTorch row-wise cross-entropy that defines what the Triton kernel must compute.

For each row ``i`` of logits ``(rows, vocab)`` with target ``t = targets[i]``:

- ``loss[i] = logsumexp(logits[i]) - logits[i, t]``, and 0 when ``t == ignore_index``;
- ``grad[i] = (softmax(logits[i]) - onehot(t)) * scale[i]``, and zeros when ``t == ignore_index``:
  the gradient of ``sum_i scale[i] * loss[i]`` with respect to the logits.
"""

import torch


def cross_entropy_reference(logits, targets, scale, ignore_index=-100):
    """Loss and gradient computed in the logits' dtype (upcast them for a high-precision reference).

    Args:
        logits: (rows, vocab).
        targets: (rows,) integer; ``ignore_index`` marks rows without a loss.
        scale: (rows,) weight of each row's loss in the gradient.
        ignore_index: the target value of ignored rows.

    Returns:
        loss: (rows,) in the logits' dtype.
        grad: (rows, vocab) in the logits' dtype.
    """
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, safe[:, None])[:, 0], 0)
    onehot = torch.nn.functional.one_hot(safe, logits.shape[1]).to(logits.dtype)
    grad = (torch.softmax(logits, dim=-1) - onehot) * (scale.to(logits.dtype) * valid)[:, None]
    return loss, grad
