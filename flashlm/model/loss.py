"""The language-model loss: next-token cross-entropy of the LM head's logits.

Three ways to compute it, all returning the mean over the tokens with a target
(``IGNORE_INDEX`` marks the others):

- the plain path: the full (tokens, vocab) logits, then ``F.cross_entropy`` in fp32;
- ``chunked_linear_cross_entropy``: the LM head and the loss a chunk of tokens at a time, so the
  logits never exist whole; the gradients are computed while each chunk's logits exist, so none
  are kept for backward. On CUDA each chunk's softmax, loss and gradient is one Triton kernel
  (``flashlm.kernels.cross_entropy``), elsewhere PyTorch;
- ``liger_linear_cross_entropy``: liger-kernel's fused kernel (CUDA only, optional dependency).

``next_token_loss`` picks one from the model config and aligns the targets.
"""

import torch
import torch.nn.functional as F

from flashlm.kernels.cross_entropy import cross_entropy_forward, cross_entropy_forward_backward_

IGNORE_INDEX = -100


def _cross_entropy_chunks(hidden, weight, targets, chunk_size, with_grads):
    """Sum of token cross-entropies of ``hidden @ weight.T``, ``chunk_size`` rows of logits at a time.

    With ``with_grads``, also the gradients of the mean loss with respect to ``hidden`` and
    ``weight``, computed while each chunk's logits exist so that none are kept for backward.
    """
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    device_type = hidden.device.type
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
    for start in range(0, hidden.shape[0], chunk_size):
        h, t, ok = hidden[start:start + chunk_size], targets[start:start + chunk_size], valid[start:start + chunk_size]
        logits = (h @ weight.T).float()
        target_logit = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
        # exp(logits - max), its sum, then softmax minus one-hot, all in the logits' buffer: one
        # (chunk, vocab) fp32 tensor and its copy in the matmul dtype are all a chunk holds.
        shift = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(shift).exp_()
        total = exp.sum(dim=-1)
        lse = total.log() + shift[:, 0]
        loss += ((lse - target_logit) * ok).sum()
        if with_grads:
            grad = exp.div_(total[:, None])
            grad[torch.arange(len(t), device=t.device), t.clamp(min=0)] -= 1
            grad = grad.mul_((ok / count)[:, None]).to(matmul_dtype)
            grad_hidden[start:start + chunk_size] = grad @ weight
            grad_weight += (grad.T @ h).float()
    return loss / count, grad_hidden, grad_weight


def _matmul_into(out, a, b, accumulate):
    """``out = a @ b`` or ``out += a @ b``, with ``a`` and ``b`` in the matmul dtype.

    On CUDA an fp32 ``out`` takes the product straight from cuBLAS's fp32 accumulator
    (``out_dtype``; torch 2.10 is the first to accept an fp32 ``addmm`` input with 16-bit
    factors), so no (rows, cols) temporary is rounded to 16 bits and no separate add pass runs.
    Elsewhere the product is formed and then cast.
    """
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda and out.dtype == torch.float32 and torch.__version__ >= (2, 10):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif accumulate:
        out += (a @ b).to(out.dtype)
    else:
        out.copy_(a @ b)


def _fused_cross_entropy_chunks(hidden, weight, targets, chunk_size, with_grads):
    """`_cross_entropy_chunks` with each chunk's softmax, loss and gradient in one Triton kernel.

    The logits stay in the matmul dtype (bf16 under autocast): the kernel reads them twice and
    writes the gradient over them, so a chunk holds one (chunk, vocab) buffer in that dtype and
    no fp32 copy. The two matmuls that follow read the gradient from that buffer.
    """
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    scale = valid.to(torch.float32) / count
    device_type = hidden.device.type
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    # Casting once here is what autocast would do per matmul; explicit casts keep the mm
    # overloads with out= and out_dtype= (which autocast does not cast) on the same operands.
    w = weight.to(matmul_dtype)
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad_hidden = hidden.new_empty(hidden.shape) if with_grads else None  # contiguous: an mm out=
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows].to(matmul_dtype)
        logits = h @ w.T
        if not with_grads:
            cross_entropy_forward(logits, targets[rows], IGNORE_INDEX, out=losses[rows])
            continue
        cross_entropy_forward_backward_(logits, targets[rows], scale[rows], IGNORE_INDEX, out=losses[rows])
        _matmul_into(grad_hidden[rows], logits, w, accumulate=False)
        _matmul_into(grad_weight, logits.T, h, accumulate=True)
    return losses.sum() / count, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, fused):
        chunks = _fused_cross_entropy_chunks if fused else _cross_entropy_chunks
        loss, grad_hidden, grad_weight = chunks(hidden, weight, targets, chunk_size, True)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def chunked_linear_cross_entropy(hidden, weight, targets, chunk_size, *, fused=None):
    """Mean cross-entropy of the logits ``hidden @ weight.T`` without materializing them.

    Args:
        hidden: (tokens, hidden_size).
        weight: (vocab, hidden_size), the LM head.
        targets: (tokens,) int64, ``IGNORE_INDEX`` (-100) for tokens without a loss.
        chunk_size: tokens per chunk; the extra memory is one (chunk_size, vocab) buffer in the
            matmul dtype on the fused path, a few fp32 ones on the PyTorch path.
        fused: run each chunk's softmax, loss and gradient as one Triton kernel
            (``flashlm.kernels.cross_entropy``). ``None``: fused when the tensors are on CUDA.
            ``True`` on CPU needs the Triton interpreter (tests); ``False`` is the PyTorch path.

    Returns:
        A scalar fp32 loss: the sum over valid tokens divided by their count (0 if none).
    """
    if fused is None:
        fused = hidden.is_cuda
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, fused)
    chunks = _fused_cross_entropy_chunks if fused else _cross_entropy_chunks
    return chunks(hidden, weight, targets, chunk_size, False)[0]


def liger_linear_cross_entropy(hidden, weight, targets, ignore_index):
    """Mean cross-entropy of ``hidden @ weight.T`` through liger-kernel's fused Triton kernel.

    Args:
        hidden: (tokens, hidden_size) on a CUDA device; weight: (vocab, hidden_size);
        targets: (tokens,) int64 with ``ignore_index`` for tokens without a loss.

    Returns:
        A scalar fp32 loss averaged over the tokens with a target.

    liger-kernel is imported here, on first use, so flashlm never requires it.
    """
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise ImportError("loss_impl='liger' needs liger-kernel (pip install liger-kernel); "
                          "loss_impl='chunked' is flashlm's own and needs nothing") from e
    if hidden.device.type != "cuda":
        raise ValueError(f"loss_impl='liger' runs on CUDA only, got inputs on {hidden.device}; "
                         "use loss_impl='chunked' on other devices")
    loss = liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction="mean")
    return loss.float()


def next_token_loss(hidden, weight, labels, chunk_size=0, impl="chunked", aligned=False):
    """Mean next-token cross-entropy of the logits ``hidden @ weight.T``.

    Args:
        hidden: (batch, seqlen, hidden_size) final hidden states.
        weight: (vocab, hidden_size), the LM head.
        labels: (batch, seqlen) int64 aligned with the inputs as in transformers: position t
            predicts labels[t + 1]; ``IGNORE_INDEX`` is ignored. With ``aligned``, already
            shifted: position t predicts labels[t] (a sequence split over ranks is shifted
            before it is split).
        chunk_size: 0 materializes the logits; otherwise tokens per chunk of ``impl``.
        impl: "chunked" (``chunked_linear_cross_entropy``) or "liger".

    Returns:
        (loss, logits): a scalar fp32 loss (0 when no position has a target), and the
        (batch, seqlen, vocab) logits in the activation dtype, or None when a chunked path never
        formed them.
    """
    if aligned:
        targets = labels.reshape(-1)
    else:
        # A target for every position, IGNORE_INDEX for the last of each row, keeps the flat
        # hidden states a view: no copy, and no zero-filled gradient in the backward pass.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    if chunk_size > 0:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if impl == "liger":
            return liger_linear_cross_entropy(flat, weight, targets, IGNORE_INDEX), None
        return chunked_linear_cross_entropy(flat, weight, targets, chunk_size), None
    logits = F.linear(hidden, weight)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / (targets != IGNORE_INDEX).sum().clamp(min=1), logits
