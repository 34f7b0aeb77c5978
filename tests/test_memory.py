"""The long-context memory levers (flashlm.model.checkpointing) on CPU: each gives the plain path's loss and
gradients, and each saves the memory it is for, counted by ``LiveTensorBytes``.

Levers: checkpointing (exact), bf16 checkpointed inputs (judged against an fp32 run, no worse
than twice what bf16 autocast itself costs), offload (exact bookkeeping; the CUDA streams are
exercised on the GPU), chunked MLP (with and without checkpointing, and without a graph), the
full-length chunked loss, and the liger loss's wiring.
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from flashlm import GPT, GPTConfig
from flashlm.model.loss import liger_linear_cross_entropy
from flashlm.profiling import LiveTensorBytes, _union_us, kernel_category, time_breakdown

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
            attn_backend="sdpa")
CHECKPOINTED = dict(gradient_checkpointing=True)
ALL_LEVERS = dict(gradient_checkpointing=True, checkpoint_dtype="bfloat16", checkpoint_offload=True,
                  mlp_chunk_size=16, loss_chunk_size=24)


def run(overrides, input_ids, labels=None, autocast=False, seed=1):
    """Loss and parameter gradients of a fresh model (same weights for the same seed)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids, labels=input_ids if labels is None else labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def batch(seqlen=33, rows=2):
    torch.manual_seed(0)
    return torch.randint(0, TINY["vocab_size"], (rows, seqlen))


def assert_same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def assert_close(a, b, rtol):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=0)
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).abs().max() / grads_b[name].abs().max()
        assert err < rtol, (name, err.item())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_checkpointing_and_offload_are_exact(autocast):
    ids = batch()
    plain = run({}, ids, autocast=autocast)
    assert_same(run(CHECKPOINTED, ids, autocast=autocast), plain)
    assert_same(run({**CHECKPOINTED, "checkpoint_offload": True}, ids, autocast=autocast), plain)


@pytest.mark.parametrize("overrides", [
    dict(mlp_chunk_size=16),
    dict(mlp_chunk_size=7, gradient_checkpointing=True),
    dict(mlp_chunk_size=1000, gradient_checkpointing=True),
    dict(loss_chunk_size=10),
], ids=["chunked-mlp", "chunked-mlp-checkpointed", "chunk-over-length", "chunked-loss"])
def test_chunked_paths_match_in_fp32(overrides):
    ids = batch()
    labels = ids.clone()
    labels[0, 3:11] = -100
    assert_close(run(overrides, ids, labels), run({}, ids, labels), rtol=2e-6)


def test_bf16_checkpoints_and_all_levers_under_autocast():
    """Against an fp32 run, bf16-kept inputs (and all levers together) are no worse than twice
    the error of plain bf16 autocast; the forward pass, and so the loss, is unchanged."""
    ids = batch(seqlen=65)
    reference = run({}, ids)
    plain = run({}, ids, autocast=True)
    for overrides in (dict(CHECKPOINTED, checkpoint_dtype="bfloat16"), ALL_LEVERS):
        loss, grads = run(overrides, ids, autocast=True)
        if "mlp_chunk_size" not in overrides:
            assert torch.equal(loss, plain[0])
        assert (loss - reference[0]).abs() <= 2 * (plain[0] - reference[0]).abs() + 1e-6
        for name, ref in reference[1].items():
            plain_err = (plain[1][name] - ref).norm()
            assert (grads[name] - ref).norm() <= 2 * plain_err + 1e-6 * ref.norm(), name


def test_chunked_mlp_without_grad_matches_logits():
    ids = batch()
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY))
    with torch.no_grad():
        plain = model(ids).logits
        model.config.mlp_chunk_size = 5
        chunked = model(ids).logits
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_checkpointed_parameters_work_with_autograd_grad():
    """Parameters are inputs of the checkpointed layer, so torch.autograd.grad reaches them and
    each .grad is accumulated once per backward pass."""
    ids = batch()
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY, **ALL_LEVERS))
    params = list(model.parameters())
    grads = torch.autograd.grad(model(ids, labels=ids).loss, params)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    counts = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
    model(ids, labels=ids).loss.backward()
    assert set(counts.values()) == {1}


def test_frozen_parameters_get_no_gradient():
    ids = batch()
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY, **ALL_LEVERS))
    frozen = model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    model(ids, labels=ids).loss.backward()
    assert frozen.grad is None and model.layers[0].mlp.gate_proj.weight.grad is not None


def measure(overrides, ids):
    """(bytes alive after the forward pass, peak bytes) of one bf16-autocast training step."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with LiveTensorBytes() as meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        kept = meter.current
        loss.backward()
    return kept, meter.peak


def test_meter_counts_live_storage():
    with LiveTensorBytes() as meter:
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)  # same storage
        c = torch.empty(500, dtype=torch.bfloat16)
        del a, b
        d = torch.empty(100, dtype=torch.float32)
    assert meter.peak == 4000 + 1000 and meter.current == 1000 + 400
    del c, d


@pytest.mark.parametrize("name, category", [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("_attn_bwd_dkdv_kernel", "attention"), ("_hopper_fwd_kernel", "attention"),
    ("_bwd_preprocess_kernel", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
    ("_cross_entropy_kernel", "loss"), ("liger_cross_entropy_kernel", "loss"),
    ("_rms_norm_bwd_kernel", "norm"), ("_rms_norm_forward_kernel", "norm"),
    ("_rope_kernel", "rope"), ("_triton_rope", "rope"), ("_swiglu_fwd_kernel", "activation"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoH (Device -> Pinned)", "copy"), ("Memset (Device)", "copy"),
    ("triton_poi_fused__to_copy_add_mul_0", "compiled"), ("triton_red_fused_mean_pow_rsqrt_1", "compiled"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise"),
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::mul", "elementwise"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "other"),
])
def test_kernel_categories(name, category):
    assert kernel_category(name) == category


def test_union_counts_overlapping_intervals_once():
    assert _union_us([(5, 7), (0, 2), (1, 3), (6, 10)]) == 3 + 5
    assert _union_us([]) == 0


def test_time_breakdown_of_a_cpu_step():
    """On a CPU the operators' own time stands in for kernels: the matmuls of a training step
    show up as matmul time, and the categories add up to the busy time."""
    model = GPT(GPTConfig.from_preset("debug"))
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
    got = time_breakdown(profile, steps=2)
    assert got["source"] == "cpu operators" and got["steps"] == 2
    assert got["category_ms"]["matmul"] > 0
    assert sum(got["category_ms"].values()) == pytest.approx(got["busy_ms"])
    assert got["top"] and all(kernel_category(k["name"]) == k["category"] for k in got["top"])
    assert max(k["ms"] for k in got["top"]) <= got["busy_ms"]


def test_each_lever_lowers_what_it_targets():
    """Each lever added in turn lowers the memory it is for and raises neither measure: the
    chunked loss and the chunked MLP lower the peak, checkpointing and bf16 checkpoints the
    bytes kept from forward to backward. (Offload moves those bytes off the GPU: on CPU it
    changes nothing, and the CUDA test checks it.)"""
    shape = dict(vocab_size=1024, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, num_hidden_layers=4)
    ids = torch.randint(0, 1024, (1, 256))
    chunked_loss = dict(shape, loss_chunk_size=64)
    checkpointed = dict(chunked_loss, gradient_checkpointing=True)
    bf16 = dict(checkpointed, checkpoint_dtype="bfloat16")
    ladder = [("plain", shape, None), ("chunked loss", chunked_loss, "peak"),
              ("checkpointing", checkpointed, "kept"), ("bf16 checkpoints", bf16, "kept"),
              ("chunked mlp", dict(bf16, mlp_chunk_size=64), "peak")]
    measured = [(name, *measure(overrides, ids), target) for name, overrides, target in ladder]
    for (_, kept_a, peak_a, _), (name, kept_b, peak_b, target) in zip(measured, measured[1:]):
        assert kept_b <= kept_a and peak_b <= peak_a, (name, kept_a, kept_b, peak_a, peak_b)
        assert (kept_b < kept_a) if target == "kept" else (peak_b < peak_a), (name, target)


def test_config_rejects_levers_it_cannot_apply():
    with pytest.raises(ValueError, match=r"GPTConfig\.checkpoint_dtype='bfloat16'.*gradient_checkpointing"):
        GPTConfig(**TINY, checkpoint_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"GPTConfig\.checkpoint_offload=True"):
        GPTConfig(**TINY, checkpoint_offload=True)
    with pytest.raises(ValueError, match=r"GPTConfig\.checkpoint_dtype='float16'"):
        GPTConfig(**TINY, gradient_checkpointing=True, checkpoint_dtype="float16")
    with pytest.raises(ValueError, match=r"GPTConfig\.loss_impl='liger'.*loss_chunk_size > 0"):
        GPTConfig(**TINY, loss_impl="liger")
    with pytest.raises(ValueError, match=r"GPTConfig\.loss_impl='fused'"):
        GPTConfig(**TINY, loss_impl="fused", loss_chunk_size=8)
    with pytest.raises(ValueError, match=r"GPTConfig\.mlp_chunk_size=-1"):
        GPTConfig(**TINY, mlp_chunk_size=-1)


def test_liger_loss_wiring(monkeypatch):
    """With loss_impl='liger' the model hands the full-length hidden states, the LM head and the
    shifted targets (-100 for each row's last position) to liger; the mean over the targets
    is the model's loss, equal to the chunked path's."""
    ids = batch()
    labels = ids.clone()
    labels[1, :5] = -100
    calls = []

    def fake_liger(hidden, weight, targets, ignore_index):
        calls.append((hidden.shape, weight.shape, targets))
        return F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)

    monkeypatch.setattr("flashlm.model.loss.liger_linear_cross_entropy", fake_liger)
    liger = run(dict(loss_chunk_size=8, loss_impl="liger"), ids, labels)
    (hidden_shape, weight_shape, targets), = calls
    assert hidden_shape == (2 * 33, 64) and weight_shape == (96, 64)
    expected = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    assert torch.equal(targets, expected)
    assert_close(liger, run(dict(loss_chunk_size=8), ids, labels), rtol=2e-6)


def test_liger_on_cpu_is_a_clear_error(monkeypatch):
    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = None
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    with pytest.raises(ValueError, match="runs on CUDA only"):
        run(dict(loss_chunk_size=8, loss_impl="liger"), batch())


def test_liger_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(ImportError, match="loss_impl='liger' needs liger-kernel"):
        liger_linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), -100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: offload streams and liger-kernel")
def test_levers_on_cuda():
    """On the GPU: offload through pinned memory and side streams gives what keeping the
    inputs on the GPU gives, and the liger loss (when installed) matches the chunked loss.
    Eager attention, and a tolerance: CUDA backward kernels may sum in any order."""
    ids = batch(seqlen=257).cuda()

    def cuda_run(overrides):
        torch.manual_seed(1)
        model = GPT(GPTConfig(**{**TINY, "attn_backend": "eager", **overrides})).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    kept = dict(CHECKPOINTED, checkpoint_dtype="bfloat16", loss_chunk_size=64)
    assert_close(cuda_run(dict(kept, checkpoint_offload=True)), cuda_run(kept), rtol=1e-5)
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return
    assert_close(cuda_run(dict(kept, loss_impl="liger")), cuda_run(kept), rtol=2e-2)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed-documents"])
def test_keep_attention_replays_the_forward_exactly(packed, monkeypatch):
    """checkpoint_keep_attention: the recomputation takes each layer's flash-attention output
    from the forward pass instead of running the forward kernel again. Same loss and gradients
    bit for bit (on a GPU, to a tight tolerance: the embedding backward there adds with atomics);
    one forward kernel launch per layer instead of two."""
    from flashlm.kernels.attention import flash_attn as fa
    launches = []
    impl = fa._flash_fwd_impl
    monkeypatch.setattr(fa, "_flash_fwd_impl", lambda *a, **kw: launches.append(1) or impl(*a, **kw))
    ids = batch(seqlen=40).to(DEVICE)
    cu = torch.tensor([0, 13, 40, 52, 80], dtype=torch.int32, device=DEVICE)
    docs = dict(cu_seqlens=cu, max_seqlen=28) if packed else {}

    def step(**overrides):
        launches.clear()
        torch.manual_seed(1)
        model = GPT(GPTConfig(**{**TINY, "attn_backend": "flash", **CHECKPOINTED, **overrides})).to(DEVICE)
        model(ids, labels=ids, **docs).loss.backward()
        return model, len(launches)

    levers = dict(checkpoint_offload=True, mlp_chunk_size=16)
    recomputed, n_recomputed = step(**levers)
    kept, n_kept = step(checkpoint_keep_attention=True, **levers)
    layers = TINY["num_hidden_layers"]
    assert (n_recomputed, n_kept) == (2 * layers, layers)
    tol = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(recomputed.named_parameters(), kept.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol, msg=name)


def test_keep_attention_needs_checkpointing_and_recomputes_on_a_second_backward():
    """The kept results serve one backward pass; a second one (retain_graph) recomputes the
    attention as plain checkpointing does, and gets the same gradients."""
    with pytest.raises(ValueError, match=r"GPTConfig\.checkpoint_keep_attention=True"):
        GPTConfig(**TINY, checkpoint_keep_attention=True)
    torch.manual_seed(1)
    model = GPT(GPTConfig(**{**TINY, "attn_backend": "flash", **CHECKPOINTED, "checkpoint_keep_attention": True}))
    model.to(DEVICE)
    ids = batch(seqlen=20).to(DEVICE)
    loss = model(ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    tol = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[name], **tol, msg=name)


PLANNED = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=192, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512,
               attn_backend="sdpa", fused_ops="torch", gradient_checkpointing="auto", checkpoint_memory_budget=1.0)


@pytest.mark.parametrize("levers", [{}, dict(loss_chunk_size=64, checkpoint_dtype="bfloat16", mlp_chunk_size=64)],
                         ids=["no-levers", "levers"])
def test_activation_model_matches_measured_bytes(levers):
    """flashlm.model.plan's memory model against LiveTensorBytes for one bf16-autocast step:
    the bytes kept from forward to backward and the peak (activations and gradients) within
    12% for whole, recomputed, offloaded and mixed plans. On a CPU an offloaded input is a
    copy in the same memory, so it is counted as state here; the GPU sweep
    (scripts/bench/memory_sweep.py --rows flashlm_auto) checks the real offload."""
    import gc

    from flashlm.model.plan import ActivationModel, estimate, parameter_count, parse_plan
    ids = torch.randint(0, PLANNED["vocab_size"], (2, 256))
    config = GPTConfig(**PLANNED, **levers)
    activations = ActivationModel(config, ids.numel(), ids.shape[1], compute_bytes=2, residual_bytes=4,
                                  param_bytes=4, backend="sdpa", fused=False, device_type="cpu")
    for spec in ("4*none", "4*checkpoint", "4*checkpoint+qkv+gate_up", "2*checkpoint,2*none",
                 "offload,checkpoint+attention,checkpoint+gate_up,none"):
        torch.manual_seed(1)
        model = GPT(config)
        model.set_checkpoint_plan(spec)
        with LiveTensorBytes() as meter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            gc.collect()
            kept = meter.current
            loss.backward()
        layers = parse_plan(spec, 4)
        host = sum(activations.host_bytes(layer) for layer in layers)
        expected_kept = (sum(activations.kept_bytes(layer) for layer in layers) + host
                         + activations.weight_cache_bytes() * sum(layer.recomputed for layer in layers)
                         + activations.outside_layers_bytes()[0])
        expected_peak, _ = estimate(layers, activations, state_bytes=host, grad_bytes=4 * parameter_count(config))
        assert abs(expected_kept / kept - 1) < 0.12, (spec, kept, expected_kept)
        assert abs(expected_peak / meter.peak - 1) < 0.12, (spec, meter.peak, expected_peak)
