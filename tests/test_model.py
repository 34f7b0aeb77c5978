"""flashlm.GPT and GPTConfig on CPU: config validation and presets, the three attention backends
(flash under the Triton interpreter), the loss paths, RoPE positions, initialization and FLOPs.

Parity with transformers' Llama lives in test_hf.py.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from flashlm import GPT, GPTConfig
from flashlm.model.loss import chunked_linear_cross_entropy

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)


def tiny(**overrides):
    return GPTConfig(**{**TINY, **overrides})


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def max_rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape", [
    ("100m", (768, 12, 12, 4, 2048, 32000, True)),
    ("1b", (2048, 16, 16, 8, 5632, 32000, False)),
])
def test_presets_have_the_benchmarked_shapes(name, shape):
    c = GPTConfig.from_preset(name)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == shape
    assert c.head_dim == c.hidden_size // c.num_attention_heads


@pytest.mark.parametrize("name", ["debug", "100m", "350m", "1b"])
def test_preset_parameter_count_matches_formula(name):
    c = GPTConfig.from_preset(name)
    with torch.device("meta"):
        model = GPT(c)
    kv = c.num_key_value_heads * c.head_dim
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    per_layer += 2 * c.hidden_size  # two RMSNorm weights
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    expected = c.num_hidden_layers * per_layer + c.hidden_size + embeddings
    assert model.num_params() == expected
    assert model.num_params(exclude_embeddings=True) == expected - c.vocab_size * c.hidden_size


def test_preset_overrides_and_dict_round_trip():
    c = GPTConfig.from_preset("debug", attn_backend="eager", loss_chunk_size=64,
                              rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert c.attn_backend == "eager" and c.loss_chunk_size == 64
    assert GPTConfig.from_dict(c.to_dict()) == c
    assert "head_dim" not in c.to_dict()


@pytest.mark.parametrize("overrides, field", [
    (dict(hidden_size=66), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=-64), "hidden_size"),
    (dict(num_hidden_layers=1.5), "num_hidden_layers"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(attn_backend="flash2"), "attn_backend"),
    (dict(loss_chunk_size=-1), "loss_chunk_size"),
    (dict(attention_deterministic="no"), "attention_deterministic"),
    (dict(eos_token_id=96), "eos_token_id"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "rope_scaling"),
])
def test_invalid_config_names_field_and_value(overrides, field):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}=") as e:
        tiny(**overrides)
    assert repr(overrides[field]) in str(e.value)


def test_attention_deterministic_reaches_the_kernel(monkeypatch):
    """GPTConfig.attention_deterministic, when set, is what every layer passes to
    flash_attn_func (the default "auto" follows torch.use_deterministic_algorithms:
    tests/test_speed_levers.py); the loss does not depend on it."""
    import flashlm.model.model as model_module
    seen = []
    real = model_module.flash_attn_func

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)
    monkeypatch.setattr(model_module, "flash_attn_func", spy)
    ids = torch.randint(0, TINY["vocab_size"], (1, 16), device=DEVICE)
    losses = []
    for deterministic in (True, False):
        torch.manual_seed(0)
        model = GPT(tiny(attn_backend="flash", attention_deterministic=deterministic)).to(DEVICE)
        losses.append(model(ids, labels=ids).loss)
        losses[-1].backward()
        assert seen == [deterministic] * TINY["num_hidden_layers"]
        seen.clear()
    assert torch.equal(losses[0], losses[1])


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['hiden_size'\]"):
        GPTConfig.from_dict({**TINY, "hiden_size": 64})
    with pytest.raises(ValueError, match="head_dim is derived"):
        GPTConfig.from_dict({**TINY, "head_dim": 16})
    with pytest.raises(ValueError, match="unknown model preset '7b'"):
        GPTConfig.from_preset("7b")


# --- attention backends ---------------------------------------------------------------------

def test_backends_agree_forward_and_backward():
    """flash (Triton interpreter on CPU) and sdpa against eager, the materialized reference, in fp32."""
    torch.manual_seed(0)
    model = GPT(tiny(num_attention_heads=4, num_key_value_heads=1)).to(DEVICE)
    input_ids = torch.randint(0, 96, (2, 37), device=DEVICE)
    results = {}
    for backend in ("eager", "sdpa", "flash"):
        model.config.attn_backend = backend
        model.zero_grad()
        out = model(input_ids)
        (out.logits.float() ** 2).mean().backward()
        results[backend] = out.logits.detach(), grads(model)
    ref_logits, ref_grads = results["eager"]
    for backend in ("sdpa", "flash"):
        logits, g = results[backend]
        assert max_rel_diff(logits, ref_logits) < 1e-5, backend
        for name in ref_grads:
            assert max_rel_diff(g[name], ref_grads[name]) < 1e-4, (backend, name)


def test_short_training_run_matches_reference_attention():
    """A few AdamW steps: flash's loss tracks the eager reference step by step."""
    losses = {}
    for backend in ("eager", "flash"):
        torch.manual_seed(0)
        model = GPT(tiny(num_hidden_layers=1, attn_backend=backend)).to(DEVICE)
        batch = torch.randint(0, 96, (2, 24), device=DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(4):
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]
    torch.testing.assert_close(losses["flash"], losses["eager"], rtol=1e-5, atol=0)


def test_auto_backend_picks_sdpa_on_cpu_and_says_so(caplog):
    torch.manual_seed(0)
    model = GPT(tiny(attn_backend="auto"))
    input_ids = torch.randint(0, 96, (1, 9))
    with caplog.at_level(logging.INFO, logger="flashlm.model"):
        auto = model(input_ids).logits
        model(input_ids)
    assert [r.message for r in caplog.records] == ["attn_backend=auto: using sdpa attention for cpu inputs"]
    model.config.attn_backend = "sdpa"
    torch.testing.assert_close(auto, model(input_ids).logits, rtol=0, atol=0)
    model.config.attn_backend = "auto"
    assert model.attn_backend(torch.device("cuda")) == "flash"


# --- loss -----------------------------------------------------------------------------------

def _reference_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    model = GPT(tiny(attn_backend="sdpa"))
    input_ids = torch.randint(0, 96, (2, 19))
    labels = input_ids.clone()
    labels[0, 5:9] = -100
    out = model(input_ids, labels=labels)
    torch.testing.assert_close(out.loss.double(), _reference_loss(out.logits.detach(), labels), rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_matches_full_loss_and_gradients(chunk):
    torch.manual_seed(0)
    input_ids = torch.randint(0, 96, (2, 21))
    labels = input_ids.clone()
    labels[1, :6] = -100
    results = []
    for chunk_size in (0, chunk):
        torch.manual_seed(1)
        for tied in (True, False):
            model = GPT(tiny(attn_backend="sdpa", loss_chunk_size=chunk_size, tie_word_embeddings=tied))
            out = model(input_ids, labels=labels)
            out.loss.backward()
            results.append((chunk_size, tied, out, grads(model)))
    for (_, tied, full, g_full), (_, _, chunked, g_chunked) in zip(results[:2], results[2:]):
        assert chunked.logits is None and full.logits is not None
        torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=0)
        for name in g_full:
            assert max_rel_diff(g_chunked[name], g_full[name]) < 1e-5, (name, tied)


def test_chunked_loss_under_bf16_autocast():
    """Under autocast (how training runs), the chunked path's error against an fp32 run is no
    worse than twice the full path's."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 96, (2, 33))
    runs = {}
    for chunk_size, autocast in ((0, False), (0, True), (8, True)):
        torch.manual_seed(1)
        model = GPT(tiny(attn_backend="sdpa", loss_chunk_size=chunk_size))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        runs[chunk_size, autocast] = loss.detach(), grads(model)
    ref_loss, ref_grads = runs[0, False]
    (full_loss, full_grads), (chunked_loss, chunked_grads) = runs[0, True], runs[8, True]
    assert (chunked_loss - ref_loss).abs() <= 2 * (full_loss - ref_loss).abs() + 1e-6
    for name in ref_grads:
        full_err = (full_grads[name] - ref_grads[name]).norm()
        assert (chunked_grads[name] - ref_grads[name]).norm() <= 2 * full_err + 1e-6 * ref_grads[name].norm(), name


def test_chunked_loss_without_grad_and_with_all_tokens_ignored():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 16), torch.randn(40, 16)
    targets = torch.randint(0, 40, (10,))
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, targets, 3)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), rtol=1e-6, atol=0)
    assert chunked_linear_cross_entropy(hidden, weight, torch.full_like(targets, -100), 3).item() == 0.0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    input_ids = torch.randint(0, 96, (2, 17))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = GPT(tiny(attn_backend="sdpa", gradient_checkpointing=checkpointing))
        model(input_ids, labels=input_ids).loss.backward()
        results.append(grads(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=0, atol=0)


# --- positions, init, FLOPs -----------------------------------------------------------------

def test_position_ids_are_relative_and_restartable():
    torch.manual_seed(0)
    model = GPT(tiny(attn_backend="sdpa"))
    input_ids = torch.randint(0, 96, (2, 16))
    default = model(input_ids).logits
    explicit = model(input_ids, position_ids=torch.arange(16)[None].expand(2, -1)).logits
    shifted = model(input_ids, position_ids=torch.arange(16)[None] + 50).logits
    restarted = model(input_ids, position_ids=torch.cat([torch.arange(6), torch.arange(10)])[None]).logits
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)
    # RoPE scores depend on position differences only.
    torch.testing.assert_close(shifted, default, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restarted[:, :6], default[:, :6], rtol=0, atol=0)
    assert (restarted[:, 6:] - default[:, 6:]).abs().max() > 1e-3


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    torch.manual_seed(0)
    model = GPT(tiny(attn_backend="sdpa", rope_theta=500000.0))
    input_ids = torch.randint(0, 96, (1, 12))
    cos, sin = model.rope(torch.arange(12)[None])
    model = model.to(torch.bfloat16)
    cos_bf16, sin_bf16 = model.rope(torch.arange(12)[None])
    assert cos_bf16.dtype == torch.float32
    torch.testing.assert_close((cos_bf16, sin_bf16), (cos, sin), rtol=0, atol=0)
    assert model(input_ids).logits.dtype == torch.bfloat16


def test_scaled_initialization():
    torch.manual_seed(0)
    c = GPTConfig.from_preset("debug", tie_word_embeddings=False)
    model = GPT(c)
    residual = c.initializer_range / math.sqrt(2 * c.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = residual if name.endswith(("o_proj.weight", "down_proj.weight")) else c.initializer_range
        assert abs(p.std().item() / expected - 1) < 0.05, name
        assert abs(p.mean().item()) < 0.1 * expected, name


def test_flops_per_token():
    for tied in (True, False):
        c = GPTConfig.from_preset("100m", tie_word_embeddings=tied)
        with torch.device("meta"):
            model = GPT(c)
        h, L, kv = c.hidden_size, c.num_hidden_layers, c.num_key_value_heads * c.head_dim
        matmul = L * (2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size) + c.vocab_size * h  # + LM head
        for seq_len in (1024, 4096):
            attention = 6 * L * c.num_attention_heads * c.head_dim * seq_len
            assert model.flops_per_token(seq_len) == 6 * matmul + attention
