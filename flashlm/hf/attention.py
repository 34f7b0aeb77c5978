"""flashlm's attention kernel inside transformers: an ``AttentionInterface`` implementation.

``register_attention()`` adds ``HF_ATTN_IMPLEMENTATION`` to transformers' ``AttentionInterface``
(and its mask interface), so that after ``import flashlm``::

    AutoModelForCausalLM.from_pretrained(path, attn_implementation=flashlm.HF_ATTN_IMPLEMENTATION)

runs a transformers model's attention on flashlm's Triton kernel. Reading
``flashlm.HF_ATTN_IMPLEMENTATION`` performs the registration, so ``import flashlm`` itself does not
pay for importing transformers. The name, "flm_triton", avoids the substring "flash" (so even
"flashlm_triton" would not do): transformers 5 sends every name containing it to its own
flash-attention kernel loader.
"""

import torch

from flashlm.kernels.attention import flash_attn_func, flash_attn_varlen_func

HF_ATTN_IMPLEMENTATION = "flm_triton"


def register_attention():
    """Register flashlm's kernel with transformers as ``HF_ATTN_IMPLEMENTATION``; returns the name.

    Idempotent. Needs transformers >= 4.53 (``AttentionInterface`` and ``AttentionMaskInterface``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"registering flashlm's attention needs transformers >= 4.53 with AttentionInterface "
                          f"and AttentionMaskInterface: {e}") from e
    AttentionInterface.register(HF_ATTN_IMPLEMENTATION, hf_attention_forward)
    AttentionMaskInterface.register(HF_ATTN_IMPLEMENTATION, hf_attention_mask)
    return HF_ATTN_IMPLEMENTATION


def hf_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """transformers' mask hook for ``HF_ATTN_IMPLEMENTATION``: builds what ``hf_attention_forward`` gets.

    Returns one of:
        None: plain causal attention over all ``kv_length`` keys, the queries being the last ones;
        a (batch, n) bool mask, n <= kv_length: the keys that exist and are not padding, the queries
            being its last ``q_length`` positions (padding, and empty static-cache slots);
        a (batch, q_length) int64 tensor of document ids: packed sequences, causal within each
            document (transformers asks for this from position_ids that restart).
    Any other pattern (sliding window, bidirectional blocks, custom masks) is refused.
    """
    from transformers.masking_utils import causal_mask_function

    if kwargs.get("cache_position") is not None:  # transformers < 5 passes positions, not offsets
        q_offset = kwargs["cache_position"][0]
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if kv_offset:
        raise ValueError(f"attn_implementation={HF_ATTN_IMPLEMENTATION!r} does not support sliding-window caches")
    device = kwargs.get("device", "cpu")
    if mask_function not in (None, causal_mask_function):
        if attention_mask is not None or q_offset or q_length != kv_length:
            raise _unsupported_mask()
        return _document_ids(mask_function, batch_size, q_length, device)
    visible = q_offset + q_length  # keys past the last query (empty static-cache slots) are never seen
    if attention_mask is None:
        return None if visible == kv_length else torch.ones(batch_size, visible, dtype=torch.bool, device=device)
    if attention_mask.shape[-1] != visible:
        raise ValueError(f"attn_implementation={HF_ATTN_IMPLEMENTATION!r}: the padding mask covers "
                         f"{attention_mask.shape[-1]} tokens, but past and current tokens number {visible}")
    mask = attention_mask.to(torch.bool)
    return None if visible == kv_length and bool(mask.all()) else mask


def _document_ids(mask_function, batch_size, length, device):
    # Read the pattern off the mask function at O(length) points: a token starts a document when
    # it may not see the token before it. Then check that the pattern is exactly causal within
    # documents: each token sees itself and its document's first token, not the token before that
    # first one, and not the next token.
    b = torch.arange(batch_size, device=device)[:, None]
    h = torch.zeros((), dtype=torch.long, device=device)
    t = torch.arange(length, device=device)[None].expand(batch_size, -1)

    def sees(q, kv):
        return mask_function(b, h, q, kv).expand(batch_size, q.shape[1]).to(torch.bool)

    starts = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    starts[:, 1:] = ~sees(t[:, 1:], t[:, :-1])
    doc_ids = starts.long().cumsum(-1) - 1
    first = torch.where(starts, t, 0).cummax(-1).values
    exact = sees(t, t).all() and sees(t, first).all() and not sees(t[:, :-1], t[:, 1:]).any()
    before = first > 0
    if before.any():
        exact = exact and not sees(t, (first - 1).clamp(min=0))[before].any()
    if not exact:
        raise _unsupported_mask()
    return doc_ids


def _unsupported_mask():
    return ValueError(f"attn_implementation={HF_ATTN_IMPLEMENTATION!r} supports causal attention with padding masks "
                      "or packed sequences; this model asks for another mask pattern (sliding window, chunked, "
                      "bidirectional or custom)")


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention hook for ``HF_ATTN_IMPLEMENTATION``, running ``flash_attn_func``.

    Args:
        query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim), as
            transformers' attention modules pass them.
        attention_mask: what ``hf_attention_mask`` returned: None, a (batch, n) bool key mask, or
            (batch, q_len) int64 document ids of packed sequences.
        scaling: softmax scale (default 1/sqrt(head_dim)).

    Returns:
        (output (batch, q_len, heads, head_dim), None): the kernel returns no attention weights.
        Outputs at padding query positions are zero.
    """
    if dropout:
        raise ValueError(f"attn_implementation={HF_ATTN_IMPLEMENTATION!r} has no attention dropout; "
                         f"set config.attention_dropout=0 (got {dropout})")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={HF_ATTN_IMPLEMENTATION!r} does not support {name}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attn_implementation={HF_ATTN_IMPLEMENTATION!r} cannot apply a {attention_mask.dim()}-D "
                         "attention mask; it supports causal attention with 2-D padding masks")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    # The kernel takes one dtype; under autocast transformers' RoPE can leave q, k in fp32 and v in bf16.
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))
    if attention_mask is None:
        out = flash_attn_func(q, k, v, softmax_scale=scaling, causal=causal)
    elif attention_mask.dtype == torch.bool:
        out = _attend_unpadded(q, k, v, attention_mask, scaling, causal)
    else:
        out = _attend_documents(q, k, v, attention_mask, scaling, causal)
    return out, None


def _cu_seqlens(lengths):
    """(n,) lengths -> (n + 1,) int32 offsets and the longest length, for the varlen kernel."""
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(lengths.max()) if lengths.numel() else 0


def _attend_unpadded(q, k, v, mask, scale, causal):
    # Each row keeps only its valid keys and queries, packed into one varlen call; causal
    # attention, aligned bottom-right per sequence as the kernel does it, is then exactly
    # causal-plus-padding, since the queries are the last valid keys.
    seqlen_q, n = q.shape[1], mask.shape[1]
    key_valid = torch.nn.functional.pad(mask, (0, k.shape[1] - n), value=False)
    query_valid = mask[:, n - seqlen_q:]
    cu_q, max_q = _cu_seqlens(query_valid.sum(1))
    cu_k, max_k = _cu_seqlens(key_valid.sum(1))
    out = q.new_zeros(q.shape)
    out[query_valid] = flash_attn_varlen_func(q[query_valid], k[key_valid], v[key_valid], cu_q, cu_k,
                                              max_q, max_k, softmax_scale=scale, causal=causal)
    return out


def _attend_documents(q, k, v, doc_ids, scale, causal):
    # Every row's documents, in order, become the sequences of one varlen call.
    lengths = torch.cat([torch.unique_consecutive(row, return_counts=True)[1] for row in doc_ids])
    cu, max_len = _cu_seqlens(lengths)
    batch, seqlen = q.shape[:2]
    flat = [t.reshape(batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)
    return out.reshape(q.shape)
