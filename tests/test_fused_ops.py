"""The fused elementwise kernels (RMSNorm, SwiGLU, RoPE) against float64 references, and the
model with ``fused_ops="triton"`` against its PyTorch path.

Runs under the Triton interpreter on CPU (fp16 and fp32) and natively on CUDA, where bf16 is
added. Tolerance follows the house rule: the kernel's error against the fp64 reference may be
at most twice that of plain PyTorch computing the same op in the same low precision, plus a few
units in the last place of the output dtype (``numerics.assert_no_worse_than_torch``). Every
output buffer is NaN-filled before the kernel writes it.
"""

import importlib

import pytest
import torch

from conftest import DEVICE
from numerics import assert_no_worse_than_torch, eps
from flashlm import GPT, GPTConfig
from flashlm.kernels import utils as kernel_utils
from flashlm.kernels.rms_norm import rms_norm, rms_norm_reference
from flashlm.kernels.rope import rotary_embedding, rotary_reference
from flashlm.kernels.swiglu import swiglu, swiglu_reference
from flashlm.model.model import apply_rotary, fused_ops_enabled

# The launchers live in modules named like the public functions the packages export.
rms_norm_module = importlib.import_module("flashlm.kernels.rms_norm.rms_norm")
swiglu_module = importlib.import_module("flashlm.kernels.swiglu.swiglu")
rope_module = importlib.import_module("flashlm.kernels.rope.rope")

ON_GPU = DEVICE == "cuda"
# The interpreter rounds fp32 -> bf16 toward zero (and its bf16 dot is wrong): bf16 on the GPU.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
EPS = 1e-5


def _name(value):
    return str(value).replace("torch.", "")


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _randn(gen, *shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=DEVICE, dtype=dtype)


def _reference(fn, inputs, grad_out, dtype):
    """Outputs and input gradients of the reference ``fn`` computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, leaves, [g.to(dtype) for g in grad_out])
    return [o.detach() for o in outs], list(grads)


def _compare(names, got, fn, inputs, grad_out, dtype):
    ref64 = _reference(fn, inputs, grad_out, torch.float64)
    low = _reference(fn, inputs, grad_out, dtype)
    for name, g, r, lo in zip(names, got, [*ref64[0], *ref64[1]], [*low[0], *low[1]]):
        assert_no_worse_than_torch(name, g, r, lo, dtype)


# --- RMSNorm --------------------------------------------------------------------------------

def _rms_inputs(seed, rows, hidden, dtype, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, rows, hidden, dtype=dtype, scale=2.0, shift=0.5)
    weight = _randn(gen, hidden, dtype=weight_dtype or dtype, scale=0.2, shift=1.0)
    return x, weight, _randn(gen, rows, hidden, dtype=dtype)


def _rms_poisoned(x, weight, dy, out_dtype=None):
    """Forward and backward through the launchers, every output buffer NaN-filled first."""
    out_dtype = out_dtype or torch.promote_types(x.dtype, weight.dtype)
    y, rstd = rms_norm_module._rms_norm_fwd(x, weight, EPS, out_dtype, empty=_nan_empty)
    dx, dweight = rms_norm_module._rms_norm_bwd(dy, x, weight, rstd, empty=_nan_empty)
    return y, dx, dweight


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("hidden", [48, 128, 200])
@pytest.mark.parametrize("rows", [1, 17, 113])
def test_rms_norm(rows, hidden, dtype):
    x, weight, dy = _rms_inputs(rows * 1000 + hidden, rows, hidden, dtype)
    got = _rms_poisoned(x, weight, dy)
    _compare(("y", "dx", "dweight"), got, lambda x, w: rms_norm_reference(x, w, EPS), (x, weight),
             (dy,), dtype)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=_name)
def test_rms_norm_low_precision_input_fp32_weight(dtype):
    """16-bit x with an fp32 weight returns fp32 (type promotion, as transformers does); dx
    comes back in x's dtype, dweight in fp32."""
    x, weight, _ = _rms_inputs(3, 33, 200, dtype, weight_dtype=torch.float32)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    y = rms_norm(*leaves, EPS)
    assert y.dtype == torch.float32
    dy = torch.randn_like(y)
    dx, dweight = torch.autograd.grad(y, leaves, dy)
    assert dx.dtype == dtype and dweight.dtype == torch.float32
    ref = [t.double().requires_grad_() for t in (x, weight)]
    ref_y = rms_norm_reference(*ref, EPS)
    ref_grads = torch.autograd.grad(ref_y, ref, dy.double())
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), ref_grads[0], rtol=2 * eps(dtype), atol=4 * eps(dtype))
    torch.testing.assert_close(dweight.double(), ref_grads[1], rtol=1e-5, atol=1e-4)


def test_rms_norm_out_dtype_is_the_rounded_fp32_result():
    """With fp32 x and weight, a 16-bit out_dtype gives exactly the fp32 result cast down
    (what autocast would do before the next matmul), and the same gradients."""
    x, weight, dy = _rms_inputs(4, 17, 200, torch.float32)
    results = {}
    for out_dtype in (torch.float32, torch.float16):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        y = rms_norm(*leaves, EPS, out_dtype=out_dtype)
        assert y.dtype == out_dtype
        results[out_dtype] = (y, *torch.autograd.grad(y, leaves, dy.to(out_dtype)))
    y32, y16 = results[torch.float32][0], results[torch.float16][0]
    assert torch.equal(y16, y32.half())
    dy16 = dy.half().float()  # the gradient autocast's cast hands back is the rounded one
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = torch.autograd.grad(rms_norm(*leaves, EPS), leaves, dy16)
    for got, ref in zip(results[torch.float16][1:], expected):
        assert torch.equal(got, ref)


def test_rms_norm_strided_and_batched_inputs():
    """Rows with a stride larger than the row (used in place), and a 3-D input whose rows
    cannot be viewed (copied once), through autograd."""
    gen = torch.Generator().manual_seed(5)
    wide = _randn(gen, 40, 77, dtype=torch.float32)
    x = wide[:, 5:69]
    assert x.stride(0) == 77 and kernel_utils.as_rows(x).data_ptr() == x.data_ptr()
    weight = _randn(gen, 64, dtype=torch.float32, shift=1.0)
    dy = _randn(gen, 40, 64, dtype=torch.float32)
    got = _rms_poisoned(x, weight, dy)
    _compare(("y", "dx", "dweight"), got, lambda x, w: rms_norm_reference(x, w, EPS), (x, weight),
             (dy,), torch.float32)
    x3 = _randn(gen, 5, 7, 48, dtype=torch.float32).transpose(0, 1)
    leaves = [x3.clone().requires_grad_(), weight[:48].clone().requires_grad_()]
    y = rms_norm(*leaves, EPS)
    dy3 = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy3)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ref_y = rms_norm_reference(*ref, EPS)
    ref_grads = torch.autograd.grad(ref_y, ref, dy3.double())
    for a, b in zip((y, *grads), (ref_y, *ref_grads)):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# --- SwiGLU ---------------------------------------------------------------------------------

def _swiglu_poisoned(gate_up, dout):
    out = swiglu_module._swiglu_fwd(gate_up, empty=_nan_empty)
    return out, swiglu_module._swiglu_bwd(dout, gate_up, empty=_nan_empty)


# 1100 spans two column blocks of 1024 with a ragged second one.
SWIGLU_SHAPES = [(rows, inter) for rows in (1, 17, 113) for inter in (48, 200, 1100) if rows * inter < 20000]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("rows,inter", SWIGLU_SHAPES, ids=lambda v: str(v))
def test_swiglu(rows, inter, dtype):
    gen = torch.Generator().manual_seed(rows * 10000 + inter)
    gate_up = _randn(gen, rows, 2 * inter, dtype=dtype, scale=2.0)
    dout = _randn(gen, rows, inter, dtype=dtype)
    got = _swiglu_poisoned(gate_up, dout)
    _compare(("out", "d_gate_up"), got, swiglu_reference, (gate_up,), (dout,), dtype)


def test_swiglu_strided_rows_and_leading_dims():
    """gate_up as a view with a row stride past its width is read in place; a 3-D input and a
    non-contiguous output gradient go through autograd."""
    gen = torch.Generator().manual_seed(8)
    wide = _randn(gen, 17, 2 * 40 + 9, dtype=torch.float16, scale=2.0)
    gate_up = wide[:, :80]
    assert kernel_utils.as_rows(gate_up).data_ptr() == gate_up.data_ptr()
    dout = _randn(gen, 17, 40, dtype=torch.float16)
    _compare(("out", "d_gate_up"), _swiglu_poisoned(gate_up, dout), swiglu_reference, (gate_up,),
             (dout,), torch.float16)
    gate_up3 = _randn(gen, 3, 5, 96, dtype=torch.float32).requires_grad_()
    out = swiglu(gate_up3)
    assert out.shape == (3, 5, 48)
    dout3 = _randn(gen, 5, 3, 48, dtype=torch.float32).transpose(0, 1)
    (grad,) = torch.autograd.grad(out, gate_up3, dout3)
    ref_in = gate_up3.detach().double().requires_grad_()
    ref = swiglu_reference(ref_in)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dout3.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


# --- RoPE -----------------------------------------------------------------------------------

def _tables(gen, batch, seqlen, head_dim):
    """cos/sin as flashlm.model.model.RotaryEmbedding makes them, for random positions per row."""
    positions = torch.randint(0, 4096, (batch, seqlen), generator=gen).float()
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = positions[..., None] * inv_freq
    return freqs.cos()[:, :, None].to(DEVICE), freqs.sin()[:, :, None].to(DEVICE)


def _rope_inputs(seed, batch, seqlen, heads, kv_heads, head_dim, dtype, table_batch=None):
    """q and k as views into one (batch, seqlen, (heads + 2 * kv_heads) * head_dim) product,
    as the model's Attention makes them, with output gradients and cos/sin tables."""
    gen = torch.Generator().manual_seed(seed)
    qkv = _randn(gen, batch, seqlen, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(batch, seqlen, heads, head_dim)
    k = k.view(batch, seqlen, kv_heads, head_dim)
    cos, sin = _tables(gen, batch if table_batch is None else table_batch, seqlen, head_dim)
    return q, k, cos, sin, torch.randn_like(q), torch.randn_like(k)


def _rope_both(q, k, cos, sin):
    return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)


def _rope_poisoned(q, k, cos, sin, dq, dk):
    q_out, k_out = rope_module._rope(q, k, cos, sin, inverse=False, empty=_nan_empty)
    dq_in, dk_in = rope_module._rope(dq, dk, cos, sin, inverse=True, empty=_nan_empty)
    return q_out, k_out, dq_in, dk_in


ROPE_SHAPES = {
    "b1-s1": (1, 1, 4, 2, 64, None),
    "b2-s17-mqa-d48": (2, 17, 4, 1, 48, 1),
    "b1-s113-d128": (1, 113, 4, 4, 128, None),
    "b2-s33-d16": (2, 33, 6, 2, 16, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", sorted(ROPE_SHAPES))
def test_rope(shape, dtype):
    batch, seqlen, heads, kv_heads, head_dim, table_batch = ROPE_SHAPES[shape]
    q, k, cos, sin, dq, dk = _rope_inputs(len(shape) + seqlen, batch, seqlen, heads, kv_heads,
                                          head_dim, dtype, table_batch)
    assert q._base is not None and k._base is q._base  # views into one product, read in place
    got = _rope_poisoned(q, k, cos, sin, dq, dk)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    # cos and sin are constants: the reference treats them as inputs of their own dtype.
    _compare(("q", "k", "dq", "dk"), got, lambda q, k: _rope_both(q, k, cos, sin), (q, k),
             (dq, dk), dtype)


def test_rope_matches_the_model_through_autograd():
    """rotary_embedding matches flashlm.model.model.apply_rotary (fp32 math, one rounding) on views
    of one q|k|v product, gradient included: bit for bit under the interpreter, within an ulp
    where the GPU compiler may fuse a multiply-add."""
    gen = torch.Generator().manual_seed(2)
    batch, seqlen, heads, kv_heads, head_dim = 2, 21, 4, 2, 32
    qkv = _randn(gen, batch, seqlen, (heads + 2 * kv_heads) * head_dim, dtype=torch.float16)
    cos, sin = _tables(gen, batch, seqlen, head_dim)
    dq = _randn(gen, batch, seqlen, heads, head_dim, dtype=torch.float16)
    dk = _randn(gen, batch, seqlen, kv_heads, head_dim, dtype=torch.float16)
    results = []
    for fused in (True, False):
        leaf = qkv.clone().requires_grad_()
        q, k, _ = leaf.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k = q.view(batch, seqlen, heads, head_dim), k.view(batch, seqlen, kv_heads, head_dim)
        outs = rotary_embedding(q, k, cos, sin) if fused else (apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))
        results.append((*outs, *torch.autograd.grad(outs, leaf, (dq, dk))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=eps(torch.float16), atol=eps(torch.float16))


# --- shared properties ----------------------------------------------------------------------

def _three_ops(dtype):
    """(name, forward+backward closure) for each op, on fixed inputs."""
    x, weight, dy = _rms_inputs(7, 37, 200, dtype)
    gate_up = torch.randn(37, 400).to(DEVICE, dtype)
    q, k, cos, sin, dq, dk = _rope_inputs(7, 2, 9, 4, 2, 48, dtype)

    def norm():
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        y = rms_norm(*leaves, EPS)
        return (y, *torch.autograd.grad(y, leaves, dy))

    def act():
        leaf = gate_up.clone().requires_grad_()
        out = swiglu(leaf)
        return (out, *torch.autograd.grad(out, leaf, torch.ones_like(out)))

    def rope():
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        outs = rotary_embedding(*leaves, cos, sin)
        return (*outs, *torch.autograd.grad(outs, leaves, (dq, dk)))

    return {"rms_norm": norm, "swiglu": act, "rope": rope}


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rope"])
def test_forward_and_backward_are_deterministic(op):
    run = _three_ops(torch.float16)[op]
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_empty_inputs():
    x = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    weight = torch.ones(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, weight, EPS)
    dx, dweight = torch.autograd.grad(y.sum() + 0 * weight.sum(), [x, weight])
    assert y.shape == (0, 64) and dx.shape == (0, 64) and torch.equal(dweight, torch.zeros(64, device=DEVICE))
    assert swiglu(torch.empty(0, 3, 8, device=DEVICE)).shape == (0, 3, 4)
    q = torch.empty(2, 0, 4, 16, device=DEVICE)
    cos = torch.empty(1, 0, 1, 8, device=DEVICE)
    assert [t.shape for t in rotary_embedding(q, q[:, :, :2], cos, cos)] == [q.shape, (2, 0, 2, 16)]


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape).to(device=device, dtype=dtype)


BAD_INPUTS = {
    "rms_not_tensor": (lambda: rms_norm([[1.0]], _t(4), EPS), TypeError, "x must be a torch.Tensor"),
    "rms_dtype": (lambda: rms_norm(_t(2, 4, dtype=torch.float64), _t(4), EPS), TypeError, "x.dtype=torch.float64"),
    "rms_weight_shape": (lambda: rms_norm(_t(2, 4), _t(5), EPS), ValueError, r"weight must have shape \(hidden,\)"),
    "rms_too_wide": (lambda: rms_norm(_t(1, 16385), _t(16385), EPS), ValueError, "hidden size 16385"),
    "rms_out_dtype": (lambda: rms_norm(_t(2, 4), _t(4), EPS, out_dtype=torch.int8), TypeError, "out_dtype"),
    "rms_devices": (lambda: rms_norm(_t(2, 4), _t(4, device="meta"), EPS), ValueError, "one device"),
    "swiglu_odd": (lambda: swiglu(_t(3, 7)), ValueError, "must be even"),
    "swiglu_int": (lambda: swiglu(torch.ones(3, 8, dtype=torch.int32)), TypeError, "gate_up.dtype"),
    "rope_rank": (lambda: rotary_embedding(_t(2, 3, 8), _t(2, 3, 1, 8), _t(1, 3, 1, 4), _t(1, 3, 1, 4)),
                  ValueError, "q must have 4 dimensions"),
    "rope_dtypes": (lambda: rotary_embedding(_t(1, 3, 2, 8), _t(1, 3, 1, 8, dtype=torch.float16),
                                             _t(1, 3, 1, 4), _t(1, 3, 1, 4)), TypeError, "share one dtype"),
    "rope_k_shape": (lambda: rotary_embedding(_t(1, 3, 2, 8), _t(1, 4, 1, 8), _t(1, 3, 1, 4), _t(1, 3, 1, 4)),
                     ValueError, "does not match q"),
    "rope_odd_dim": (lambda: rotary_embedding(_t(1, 3, 2, 7), _t(1, 3, 1, 7), _t(1, 3, 1, 3), _t(1, 3, 1, 3)),
                     ValueError, "head_dim=7"),
    "rope_table": (lambda: rotary_embedding(_t(2, 3, 2, 8), _t(2, 3, 1, 8), _t(3, 3, 1, 4), _t(3, 3, 1, 4)),
                   ValueError, r"cos must have shape \(2 or 1, 3, 1, 4\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case):
    call, exc, message = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        call()


def test_cpu_tensors_rejected_without_interpreter(monkeypatch):
    """When Triton cannot run CPU tensors, the error says so and names the way out."""
    monkeypatch.setattr(kernel_utils, "is_interpreted", lambda kernel: False)
    x = torch.randn(2, 8)
    for call in (lambda: rms_norm(x, torch.ones(8), EPS), lambda: swiglu(x),
                 lambda: rotary_embedding(x.view(1, 2, 1, 8), x.view(1, 2, 1, 8), x[:, :4].reshape(1, 2, 1, 4),
                                          x[:, 4:].reshape(1, 2, 1, 4))):
        with pytest.raises(ValueError, match="fused_ops='torch'"):
            call()


# --- the model ------------------------------------------------------------------------------

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
            attn_backend="sdpa")


def _train_step(fused_ops, input_ids, autocast_dtype=None, seed=1, **overrides):
    """Loss, logits and parameter gradients of a fresh model (same weights for the same seed)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY, fused_ops=fused_ops, **overrides)).to(DEVICE)
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(input_ids, labels=input_ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _batch(rows=2, seqlen=17):
    return torch.randint(0, TINY["vocab_size"], (rows, seqlen), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def test_config_field_and_resolution():
    with pytest.raises(ValueError, match=r"GPTConfig\.fused_ops='cuda'"):
        GPTConfig(**TINY, fused_ops="cuda")
    config = GPTConfig(**TINY)
    assert config.fused_ops == "auto" and config.to_dict()["fused_ops"] == "auto"
    assert fused_ops_enabled(config, torch.device("cuda", 0))
    assert not fused_ops_enabled(config, torch.device("cpu"))
    assert fused_ops_enabled(GPTConfig(**TINY, fused_ops="triton"), torch.device("cpu"))
    assert not fused_ops_enabled(GPTConfig(**TINY, fused_ops="torch"), torch.device("cuda", 0))


@pytest.mark.skipif(ON_GPU, reason="checks that auto keeps CPU inputs on the PyTorch path")
def test_auto_on_cpu_never_calls_a_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a fused kernel ran for CPU inputs under fused_ops='auto'")

    import flashlm.model.model as model_module
    for name in ("rms_norm", "swiglu", "rotary_embedding"):
        monkeypatch.setattr(model_module, name, refuse)
    ids = _batch()
    loss, grads = _train_step("auto", ids)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_model_fused_matches_torch_in_fp32():
    ids = _batch()
    fused_loss, fused_grads = _train_step("triton", ids)
    torch_loss, torch_grads = _train_step("torch", ids)
    torch.testing.assert_close(fused_loss, torch_loss, rtol=1e-6, atol=0)
    for name, ref in torch_grads.items():
        err = ((fused_grads[name] - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (name, err)


def test_model_fused_through_the_memory_levers():
    """flashlm.model.checkpointing calls the norm, attention and MLP modules itself. Checkpointing
    recomputes the same kernels on the same inputs: bit-identical gradients on the CPU (on
    CUDA, SDPA's backward may sum in another order). With every lever (bf16 offloaded inputs,
    chunked MLP, chunked loss) the loss is unchanged up to summation order, and the gradients
    move by about the bf16 rounding of the recomputed inputs."""
    ids = _batch()
    plain = _train_step("triton", ids)
    ckpt = _train_step("triton", ids, gradient_checkpointing=True)
    for name, ref in plain[1].items():
        if ON_GPU:
            torch.testing.assert_close(ckpt[1][name], ref, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(ckpt[1][name], ref), name
    assert torch.equal(ckpt[0], plain[0])
    loss, grads = _train_step("triton", ids, gradient_checkpointing=True, checkpoint_dtype="bfloat16",
                              checkpoint_offload=True, mlp_chunk_size=16, loss_chunk_size=10)
    torch.testing.assert_close(loss, plain[0], rtol=1e-5, atol=0)
    for name, ref in plain[1].items():
        assert ((grads[name] - ref).abs().max() / ref.abs().max()).item() < 2e-2, name


def test_model_fused_under_autocast_is_no_worse_than_torch():
    """Under autocast over fp32 weights (the training setup: the norms emit the autocast dtype
    directly), the fused model's loss and gradients are no further from an fp32 run than the
    PyTorch path's under the same autocast, up to 2x. bf16 on the GPU; fp16 under the
    interpreter, whose bf16 conversion truncates."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    ids = _batch(seqlen=33)
    reference = _train_step("torch", ids)
    plain = _train_step("torch", ids, autocast_dtype=dtype)
    fused = _train_step("triton", ids, autocast_dtype=dtype)
    assert (fused[0] - reference[0]).abs() <= 2 * (plain[0] - reference[0]).abs() + 1e-6
    for name, ref in reference[1].items():
        plain_err = (plain[1][name] - ref).norm()
        assert (fused[1][name] - ref).norm() <= 2 * plain_err + 1e-6 * ref.norm(), name


def test_norms_before_matmuls_emit_the_autocast_dtype():
    """Fused, the block norms hand the projections the autocast dtype directly; the final norm
    keeps the residual stream's fp32 for the loss. The PyTorch path returns fp32 throughout."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    seen = {}
    for fused_ops in ("triton", "torch"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY, fused_ops=fused_ops)).to(DEVICE)
        for name in ("layers.0.attn_norm", "layers.1.mlp_norm", "norm"):
            model.get_submodule(name).register_forward_hook(
                lambda module, args, out, key=(fused_ops, name): seen.__setitem__(key, (args[0].dtype, out.dtype)))
        with torch.autocast(DEVICE, dtype=dtype):
            model(_batch())
    fp32 = torch.float32
    assert seen[("triton", "layers.0.attn_norm")] == seen[("triton", "layers.1.mlp_norm")] == (fp32, dtype)
    assert seen[("triton", "norm")] == (fp32, fp32)
    assert {seen[("torch", name)] for name in ("layers.0.attn_norm", "layers.1.mlp_norm", "norm")} == {(fp32, fp32)}
