"""The speed levers (on CPU; on a GPU where the tests say so): attention determinism that follows PyTorch, per-layer activation
checkpointing plans and their planner (flashlm.model.plan), and regional torch.compile of the
decoder blocks (flashlm.model.compile).

A plan recomputes, offloads or keeps each layer and keeps chosen ops of a recomputed layer; every
plan gives the plain path's loss and gradients bit for bit (fp32 and bf16 autocast; the kept
projections and attention outputs are replayed, not recomputed). The compiled blocks are traced
with ``aot_eager`` here (no code generation: the same kernels, so the same bits) and must not
break the graph or recompile per sequence length; Inductor on CUDA is checked against eager
with a tolerance.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICE, cpu_process_env
from flashlm import GPT, GPTConfig
from flashlm.model import checkpointing
from flashlm.model.compile import compile_blocks, compile_enabled, uncompile_blocks
from flashlm.model.plan import (GIB, MIN_SPLIT_GAIN, MIN_SPLIT_TOKENS, ActivationModel, LayerPlan, format_plan,
                               estimate, parse_plan, plan_checkpointing, plan_for_training, plan_split,
                               training_state_bytes)

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
AUTO = dict(gradient_checkpointing="auto", checkpoint_memory_budget=1.0)
MIXED = "offload,checkpoint+qkv+gate_up,checkpoint+attention+qkv,none"


def build(overrides, plan=None):
    torch.manual_seed(1)
    model = GPT(GPTConfig(**{**TINY, **overrides})).to(DEVICE)
    if plan is not None:
        model.set_checkpoint_plan(plan)
    return model


def step(model, ids, autocast=False):
    """Loss and parameter gradients of one forward and backward pass."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    """Bit for bit on the CPU; on a GPU to a tight tolerance (the embedding's backward adds
    with atomics there)."""
    tol = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a[0], b[0], **tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=name)


def ids_of(seqlen, rows=2):
    torch.manual_seed(0)
    return torch.randint(0, TINY["vocab_size"], (rows, seqlen)).to(DEVICE)


# --- determinism ------------------------------------------------------------------------------

@pytest.fixture
def restore_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_attention_determinism_follows_pytorch_by_default(monkeypatch, restore_determinism):
    """attention_deterministic="auto" (the default) passes torch's global switch to the kernel,
    read at each call; true and false override it."""
    import flashlm.model.model as model_module
    seen = []
    real = model_module.flash_attn_func
    monkeypatch.setattr(model_module, "flash_attn_func",
                        lambda *a, **kw: seen.append(kw["deterministic"]) or real(*a, **kw))
    assert GPTConfig(**TINY).attention_deterministic == "auto"
    ids = ids_of(16)
    layers = TINY["num_hidden_layers"]
    for setting, expected in (("auto", [False, True]), (True, [True, True]), (False, [False, False])):
        model = build(dict(attn_backend="flash", attention_deterministic=setting))
        for global_switch, want in zip((False, True), expected):
            # warn_only: cuBLAS would want CUBLAS_WORKSPACE_CONFIG set before it started
            torch.use_deterministic_algorithms(global_switch, warn_only=True)
            seen.clear()
            model(ids, labels=ids).loss.backward()
            assert seen == [want] * layers, (setting, global_switch)


# --- plans ------------------------------------------------------------------------------------

def test_plan_strings_round_trip_and_bad_items_are_named():
    layers = parse_plan(MIXED, 4)
    assert layers[1] == LayerPlan("checkpoint", frozenset({"qkv", "gate_up"}))
    assert format_plan(layers) == MIXED
    assert format_plan(parse_plan("2*offload,checkpoint,checkpoint,none", 5)) == "2*offload,2*checkpoint,none"
    for spec, message in (("3*checkpoint", "covers 3 layers, the model has 4"),
                          ("2*checkpoint,2*recompute", "plan item '2\\*recompute': unknown layer mode"),
                          ("4*checkpoint+mlp", "unknown kept op"), ("4*none+qkv", "mode 'none' keeps everything"),
                          ("0*none,4*none", "positive COUNT")):
        with pytest.raises(ValueError, match=message):
            parse_plan(spec, 4)


@pytest.mark.parametrize("backend, autocast", [("sdpa", False), ("sdpa", True), ("flash", False)],
                         ids=["sdpa-fp32", "sdpa-bf16-autocast", "flash-fp32"])
def test_mixed_plan_gives_the_plain_paths_loss_and_gradients(backend, autocast, monkeypatch):
    """A plan that mixes every mode and kept op equals the plain path bit for bit; the kept
    projections are replayed (no matmul in the recomputation), and with flash the kept attention
    output is too (one forward kernel fewer)."""
    replays = []
    apply = checkpointing._ReplayedLinear.apply
    monkeypatch.setattr(checkpointing._ReplayedLinear, "apply", lambda *a: replays.append(1) or apply(*a))
    ids = ids_of(33)
    plain = step(build(dict(attn_backend=backend)), ids, autocast)
    assert_same(step(build(dict(attn_backend=backend, **AUTO), MIXED), ids, autocast), plain)
    assert len(replays) == 3  # qkv twice, gate_up once
    chunked = dict(attn_backend=backend, mlp_chunk_size=16)
    assert_same(step(build(dict(chunked, **AUTO), "checkpoint+gate_up,offload+gate_up,2*none"), ids, autocast),
                step(build(chunked), ids, autocast))


def test_true_is_every_layer_checkpointed():
    """gradient_checkpointing: true is the plan of every layer recomputed with the config's
    levers, and runs the same path as that plan set by hand."""
    ids = ids_of(20)
    levers = dict(checkpoint_dtype="bfloat16", mlp_chunk_size=8)
    everything = build(dict(gradient_checkpointing=True, checkpoint_offload=True, **levers))
    assert everything.layer_plans() == parse_plan("4*offload", 4)
    assert_same(step(everything, ids, True), step(build(dict(AUTO, **levers), "4*offload"), ids, True))
    assert build(dict(gradient_checkpointing=False)).layer_plans() == parse_plan("4*none", 4)


def test_auto_without_a_plan_and_bad_plans_are_errors():
    model = build(AUTO)
    ids = ids_of(8)
    with pytest.raises(RuntimeError, match="needs its plan before training"):
        model(ids, labels=ids)
    with torch.no_grad():
        model(ids, labels=ids)  # no checkpointing without a graph: no plan needed
    with pytest.raises(ValueError, match="covers 2 layers"):
        model.set_checkpoint_plan("2*none")
    with pytest.raises(ValueError, match="gradient_checkpointing='auto'"):
        build(dict(gradient_checkpointing=True)).set_checkpoint_plan("4*none")


@pytest.mark.parametrize("overrides, field", [
    (dict(gradient_checkpointing="sometimes"), "gradient_checkpointing"),
    (dict(gradient_checkpointing="auto"), "checkpoint_memory_budget"),
    (dict(gradient_checkpointing="auto", checkpoint_memory_budget=-1.0), "checkpoint_memory_budget"),
    (dict(gradient_checkpointing=True, checkpoint_memory_budget=-0.5), "checkpoint_memory_budget"),
    (dict(AUTO, checkpoint_offload=True), "checkpoint_offload"),
    (dict(AUTO, checkpoint_keep_attention=True), "checkpoint_keep_attention"),
    (dict(attention_deterministic="maybe"), "attention_deterministic"),
    (dict(compile="always"), "compile"),
])
def test_invalid_lever_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}="):
        GPTConfig(**{**TINY, **overrides})


def _lever_config(preset):
    return GPTConfig.from_preset(preset, max_position_embeddings=131072, loss_chunk_size=2048,
                                 checkpoint_dtype="bfloat16", mlp_chunk_size=16384, **AUTO)


@pytest.mark.parametrize("preset, seq_len", [("100m", 4096), ("1b", 4096), ("1b", 131072)])
def test_planner_is_monotone_in_the_budget(preset, seq_len):
    """More memory never buys more recomputation or a smaller estimated peak; a budget that
    fits the whole model keeps every layer whole; one that fits nothing says so."""
    config = _lever_config(preset)
    batch = max(1, 32768 // seq_len)
    plans = [plan_checkpointing(config, seq_len, batch, int(gib * GIB)) for gib in range(2, 81, 2)]
    for small, large in zip(plans, plans[1:]):
        assert large.recompute <= small.recompute and large.peak_bytes >= small.peak_bytes
        assert large.fits or not small.fits
    assert not plans[0].fits and plans[0].peak_bytes == min(p.peak_bytes for p in plans)
    assert any(p.fits and 0 < p.recompute for p in plans)  # a mixed plan between the extremes
    assert plans[-1].recompute == min(p.recompute for p in plans) < plans[0].recompute
    # A whole layer's chunked MLP recomputes gate|up, so only an unchunked MLP makes the
    # plan with the most memory recompute nothing.
    unchunked = GPTConfig.from_dict({**config.to_dict(), "mlp_chunk_size": 0})
    roomy = plan_checkpointing(unchunked, seq_len, batch, 80 * GIB)
    if roomy.fits and roomy.peak_bytes < 40 * GIB:
        assert roomy.spec == f"{config.num_hidden_layers}*none" and roomy.recompute == 0


def test_splitting_the_micro_batch_cuts_recomputation_in_the_same_budget():
    """1b at 4K, 32K tokens a micro-batch, in 17.3 GiB (HF + liger's peak there): sub-batches
    of 8K tokens keep more layers whole, and the split is the sub-batch's own plan. With too
    little memory, the smallest peak is chosen."""
    config = _lever_config("1b")
    budget = int(17.3 * GIB)
    whole = plan_checkpointing(config, 4096, 8, budget)
    split = plan_split(config, 4096, 8, budget)
    assert whole.fits and split.fits and split.split > 1 and whole.split == 1
    assert split.recompute_share < whole.recompute_share - MIN_SPLIT_GAIN
    assert 8 // split.split * 4096 >= MIN_SPLIT_TOKENS
    # Sub-batches after the first run with every gradient held: the sub-batch's plan with them.
    assert split == dataclasses.replace(plan_checkpointing(config, 4096, 8 // split.split, budget, accumulating=True),
                                        split=split.split)
    model = ActivationModel(config, tokens=8 // split.split * 4096, seq_len=4096)
    state, grads = training_state_bytes(config)
    assert estimate(split.layers, model, state + grads, 0)[0] == split.peak_bytes
    assert estimate(split.layers, model, state, grads)[0] < split.peak_bytes  # one pass: they build up
    assert "each micro-batch runs as" in split.describe() and "sub-batches" not in whole.describe()
    # With room for every layer whole, a sub-batch of mlp_chunk_size tokens runs its MLP
    # unchunked and so recomputes nothing; an unchunked MLP has nothing to gain from a split.
    roomy = plan_split(config, 4096, 8, 80 * GIB)
    assert roomy.split == 2 and roomy.recompute == 0 < plan_checkpointing(config, 4096, 8, 80 * GIB).recompute
    unchunked = GPTConfig.from_dict({**config.to_dict(), "mlp_chunk_size": 0})
    assert plan_split(unchunked, 4096, 8, 80 * GIB) == plan_checkpointing(unchunked, 4096, 8, 80 * GIB)
    starved = plan_split(config, 4096, 8, 2 * GIB)
    assert not starved.fits and starved.split == 8 * 4096 // MIN_SPLIT_TOKENS
    finest = plan_split(config, 4096, 8, 2 * GIB, min_tokens=1)
    assert finest.split == 8 and finest.peak_bytes < starved.peak_bytes


class MatmulFlops(TorchDispatchMode):
    """FLOPs of the matrix products (mm, addmm, bmm) that run while active."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:]
            self.flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("plan, mlp_chunk", [("4*none", 32), ("4*checkpoint", 0), ("4*checkpoint", 32),
                                             ("checkpoint+qkv,checkpoint+gate_up,offload,none", 32)])
def test_recompute_cost_counts_the_products_the_backward_runs(plan, mlp_chunk):
    """The planner's cost of a plan, in matrix products, is what a training step runs beyond a
    whole model's: the recomputed q|k|v, o and gate|up products (never down_proj, whose value
    the recomputation does not need), kept products skipped, and a whole layer's chunked MLP
    recomputing gate|up. Counted on the CPU with SDPA, whose CPU kernel is not a matmul op, on
    any test device: on CUDA, fp32 SDPA with grouped heads can take its math path, whose
    matmuls would count the recomputed attention too (4 x the attention forward's FLOPs here
    on the H100)."""
    seqlen, rows = 48, 2
    def step_flops(overrides, layers=None):
        torch.manual_seed(1)
        model = GPT(GPTConfig(**{**TINY, "attn_backend": "sdpa", **overrides}))
        if layers is not None:
            model.set_checkpoint_plan(layers)
        counter = MatmulFlops()
        with counter:
            step(model, ids_of(seqlen, rows).cpu())
        return counter.flops

    whole = step_flops({})
    planned = step_flops(dict(mlp_chunk_size=mlp_chunk, **AUTO), plan)
    config = GPTConfig(**TINY, attn_backend="sdpa", mlp_chunk_size=mlp_chunk, **AUTO)
    model = ActivationModel(config, tokens=seqlen * rows, seq_len=seqlen, backend="sdpa", device_type="cpu")
    parts = model.forward_flops()
    matmuls = {"qkv", "o", "gate_up", "down"}
    expected = modelled = 0
    for layer in parse_plan(plan, TINY["num_hidden_layers"]):
        if layer.recomputed:
            expected += sum(parts[k] for k in matmuls - {"down"} - model.kept_ops(layer))
            others = sum(v for k, v in parts.items() if k not in matmuls | model.kept_ops(layer))
        else:
            expected += parts["gate_up"] if model.chunked_mlp else 0
            others = parts["swiglu"] if model.chunked_mlp else 0
        # The model's cost of the layer, less its attention and elementwise equivalents.
        modelled += model.recompute_cost(layer) / (1.01 if layer.mode == "offload" else 1) - others
    assert planned - whole == expected > 0
    assert modelled == pytest.approx(expected, rel=1e-9)


def test_planner_keeps_attention_only_with_flash_and_offloads_only_when_allowed():
    config = _lever_config("1b")
    tight = dict(seq_len=131072, micro_batch_size=1, budget_bytes=26 * GIB)
    flash = plan_checkpointing(config, **tight)
    assert any("attention" in layer.keep for layer in flash.layers)
    sdpa = plan_checkpointing(config, **tight, backend="sdpa", allow_offload=False)
    assert not any("attention" in layer.keep or layer.mode == "offload" for layer in sdpa.layers)


def test_plan_for_training_sets_and_describes_the_plan():
    model = build(dict(gradient_checkpointing="auto", checkpoint_memory_budget=4.0, attn_backend="sdpa"))
    plan = plan_for_training(model, seq_len=64, micro_batch_size=2, device="cpu", mixed_precision="no")
    assert model.checkpoint_plan == plan.layers and plan.fits
    assert plan.spec == "4*none"  # 4 GiB holds a tiny model whole
    text = plan.describe()
    assert text.startswith("activation checkpointing plan: 4*none") and "budget of 4.00 GiB" in text


def test_plan_for_training_takes_a_budget_in_bytes_over_the_config():
    """``budget_bytes`` replaces the config's budget: a budget below what the whole model needs
    recomputes layers that 4 GiB keeps, and the plan records the budget it was made for."""
    model = build(dict(gradient_checkpointing="auto", checkpoint_memory_budget=4.0, attn_backend="sdpa"))
    roomy = plan_for_training(model, seq_len=64, micro_batch_size=2, device="cpu", mixed_precision="no")
    tight_bytes = roomy.state_bytes + (roomy.peak_bytes - roomy.state_bytes) // 2
    tight = plan_for_training(model, seq_len=64, micro_batch_size=2, device="cpu", mixed_precision="no",
                              budget_bytes=tight_bytes)
    assert tight.budget_bytes == tight_bytes and roomy.budget_bytes == 4 * GIB
    assert tight.recompute > roomy.recompute == 0 and tight.peak_bytes < roomy.peak_bytes
    assert model.checkpoint_plan == tight.layers


# --- regional compile -------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_is_off_by_default_and_auto_means_cuda_only():
    assert not compile_enabled(GPTConfig(**TINY), "cuda")  # until measured faster on the GPU
    config = GPTConfig(**TINY, compile="auto")
    assert compile_enabled(config, "cuda") and not compile_enabled(config, "cpu")
    assert compile_enabled(GPTConfig(**TINY, compile=True), "cpu")
    assert not compile_enabled(GPTConfig(**TINY, compile=False), "cuda")


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_compiled_blocks_match_eager_without_graph_breaks_or_per_length_recompiles(backend, fresh_dynamo, capfd):
    """Both halves compile whole (fullgraph, so a graph break would raise) on the plain and the
    checkpointed paths; the flash kernel is a custom op in the graph. The gradients equal eager's
    bit for bit, and new sequence lengths (multiples of 16, as the ladder's are) reuse the graphs
    compiled for the first one. A failure lists Dynamo's reasons for each recompile."""
    counter = CompileCounterWithBackend("aot_eager")
    overrides = dict(attn_backend=backend, **AUTO)
    plan = "checkpoint,offload,2*none"
    compiled, eager = build(overrides, plan), build(overrides, plan)
    compile_blocks(compiled, backend=counter)
    frames = []
    torch._logging.set_logs(recompiles=True)
    try:
        for seqlen in (16, 32, 48) if backend == "sdpa" else (16, 32):
            ids = ids_of(seqlen)
            assert_same(step(compiled, ids), step(eager, ids))
            frames.append(counter.frame_count)
    finally:
        torch._logging.set_logs()
    reasons = [line for line in capfd.readouterr().err.splitlines() if "__recompiles" in line]
    assert frames[0] > 0 and len(set(frames)) == 1, (frames, "\n".join(reasons))
    assert not counters["graph_break"]
    uncompile_blocks(compiled)
    assert all(block.compiled is None for block in compiled.layers)


def test_fused_kernel_launches_add_no_per_length_guards():
    """The test above traces PyTorch's ops on a CPU. On CUDA Dynamo also traces the fused Triton
    kernels' launches, whose host code (grids, buffer sizes) can add guards on the length: that
    once recompiled the blocks for every new length on the GPU alone. tests/dynamo_fused_probe.py
    traces those launches on the CPU (the interpreter runs them): new lengths reuse the graphs
    of the first."""
    env = {k: v for k, v in cpu_process_env().items() if k != "TRITON_INTERPRET"}
    probe = Path(__file__).with_name("dynamo_fused_probe.py")
    result = subprocess.run([sys.executable, str(probe), "16", "32", "48"], env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-4000:]
    frames = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("frames ")]
    reasons = [line for line in result.stderr.splitlines() if "__recompiles" in line]
    assert len(frames) == 3 and frames[0] > 0 and len(set(frames)) == 1, (frames, "\n".join(reasons))


def test_taped_halves_run_eagerly(fresh_dynamo, monkeypatch):
    """A half with a kept op records and replays it eagerly (the tape is Python state); the
    other half of the same layer, and every untaped layer, run compiled. Same bits as eager."""
    compiled_calls = []
    ids = ids_of(16)
    model = build(AUTO, "checkpoint+gate_up,checkpoint+qkv,2*none")
    halves = compile_blocks(model, backend="aot_eager")
    for name in ("attention_half", "mlp_half"):
        fn = getattr(halves, name)
        object.__setattr__(halves, name, lambda *a, fn=fn, name=name: compiled_calls.append(name) or fn(*a))
    assert_same(step(model, ids), step(build(AUTO, "checkpoint+gate_up,checkpoint+qkv,2*none"), ids))
    # forward: the untaped halves (layer 0's attention, layer 1's MLP, both of layers 2 and 3);
    # the recomputation of layers 1 and 0: the same untaped halves again
    assert compiled_calls.count("attention_half") == 3 + 1 and compiled_calls.count("mlp_half") == 3 + 1


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton RMSNorm/RoPE/SwiGLU kernels run under the CPU "
                    "interpreter here, whose InterpretedFunction Dynamo cannot trace; CUDA only")
def test_inductor_blocks_with_fused_kernels_on_cuda(fresh_dynamo):
    """On the GPU: Inductor, flash attention and the fused Triton kernels in one graph per half
    (fullgraph), with the eager path's loss and gradients to bf16 tolerance."""
    ids = ids_of(257)
    overrides = dict(attn_backend="flash", fused_ops="triton", **AUTO)
    eager, compiled = build(overrides, MIXED), build(overrides, MIXED)
    compile_blocks(compiled)
    loss_e, grads_e = step(eager, ids, autocast=True)
    loss_c, grads_c = step(compiled, ids, autocast=True)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=1e-3)
    for name, g in grads_e.items():
        err = (grads_c[name] - g).abs().max() / g.abs().max()
        assert err < 2e-2, (name, err.item())
    assert not counters["graph_break"]
