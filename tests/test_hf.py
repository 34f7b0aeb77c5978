"""Hugging Face interop on CPU: logits parity with transformers' LlamaForCausalLM in both
directions, the export/import round trip, the `flashlm export` command, flashlm's kernel
registered as a transformers attention implementation (under the Triton interpreter), and
clear errors for checkpoints flashlm cannot load.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flashlm
from conftest import DEVICE
from flashlm import GPT, GPTConfig
from flashlm.hf import UnsupportedCheckpointError, from_hf_config, load_pretrained, save_pretrained, to_hf_config

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
ROPE_SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def tiny_config(**overrides):
    return GPTConfig(**{**TINY, "attn_backend": "sdpa", **overrides})


def tiny_llama(rope_scaling=None, tie=False, **overrides):
    """A randomly initialized transformers Llama with GQA; transformers' own init, not flashlm's."""
    rope_parameters = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": TINY["rope_theta"]}
    fields = {k: v for k, v in TINY.items() if k != "rope_theta"}
    config = LlamaConfig(**fields, rope_parameters=rope_parameters, tie_word_embeddings=tie, **overrides)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # transformers initializes norms to one; make them informative
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def logits_of(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def assert_rope_matches(ours, theirs):
    torch.testing.assert_close(ours.rope.inv_freq, theirs.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert ours.rope.attention_scaling == pytest.approx(theirs.model.rotary_emb.attention_scaling, rel=1e-6)


# --- parity in both directions --------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=str)
def test_flashlm_to_transformers_logits_match(tmp_path, scaling, tie):
    torch.manual_seed(0)
    model = GPT(tiny_config(rope_scaling=ROPE_SCALINGS[scaling], tie_word_embeddings=tie)).eval()
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf) is LlamaForCausalLM
    assert hf.config.tie_word_embeddings is tie
    assert_rope_matches(model, hf)
    input_ids = torch.randint(0, 96, (2, 50))  # past original_max_position_embeddings of the scalings
    position_ids = torch.arange(50)[None] + 7
    for kwargs in ({}, {"position_ids": position_ids}):
        ours, theirs = logits_of(model, input_ids, **kwargs), logits_of(hf, input_ids, **kwargs)
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=str)
def test_transformers_to_flashlm_logits_match(tmp_path, scaling, tie):
    torch.manual_seed(0)
    hf = tiny_llama(ROPE_SCALINGS[scaling], tie=tie)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, attn_backend="sdpa").eval()
    assert model.config.tie_word_embeddings is tie
    assert (model.lm_head.weight is model.embed.weight) is tie
    assert_rope_matches(model, hf)
    input_ids = torch.randint(0, 96, (2, 50))
    ours, theirs = logits_of(model, input_ids), logits_of(hf, input_ids)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_rope_scalings_change_the_frequencies():
    """Guards the parity tests above against comparing scalings that do nothing."""
    freqs = {name: GPT(tiny_config(rope_scaling=s)).rope.inv_freq for name, s in ROPE_SCALINGS.items()}
    for name in ("linear", "llama3", "yarn"):
        assert not torch.allclose(freqs[name], freqs["none"]), name


def test_legacy_v4_config_keys_are_read(tmp_path):
    """A config.json with only rope_theta/rope_scaling (transformers v4 style) imports the same."""
    torch.manual_seed(0)
    hf = tiny_llama(ROPE_SCALINGS["llama3"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    config["torch_dtype"] = config.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_pretrained(tmp_path).eval()
    assert model.config.rope_scaling["rope_type"] == "llama3"
    input_ids = torch.randint(0, 96, (1, 40))
    torch.testing.assert_close(logits_of(model, input_ids), logits_of(hf, input_ids), rtol=1e-5, atol=1e-5)


def test_exported_config_carries_v4_and_v5_rope_keys():
    config = to_hf_config(tiny_config(rope_scaling=ROPE_SCALINGS["yarn"]))
    assert config["rope_theta"] == TINY["rope_theta"]
    assert config["rope_scaling"] == ROPE_SCALINGS["yarn"]
    assert config["rope_parameters"] == {**ROPE_SCALINGS["yarn"], "rope_theta": TINY["rope_theta"]}
    loaded = LlamaConfig.from_dict(config)
    assert loaded.rope_parameters["rope_type"] == "yarn" and loaded.rope_parameters["factor"] == 4.0


# --- export files, sharding, round trip -----------------------------------------------------

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_name_map_covers_every_parameter_once(tie):
    from flashlm.hf.convert import hf_names

    config = tiny_config(tie_word_embeddings=tie)
    pairs = hf_names(config)
    assert sorted(ours for ours, _ in pairs) == sorted(dict(GPT(config).named_parameters()))
    hf_params = dict(tiny_llama(tie=tie).named_parameters())  # transformers lists a tied head once, too
    assert sorted(theirs for _, theirs in pairs) == sorted(hf_params)


def read_dir(path):
    files = sorted(p.name for p in Path(path).iterdir())
    tensors = {}
    for name in files:
        if name.endswith(".safetensors"):
            tensors.update(load_file(Path(path) / name))
    return files, json.loads((Path(path) / "config.json").read_text()), tensors


@pytest.mark.parametrize("shard", [None, 20_000], ids=["single", "sharded"])
def test_export_import_export_round_trip(tmp_path, shard):
    torch.manual_seed(0)
    config = tiny_config(rope_scaling=ROPE_SCALINGS["yarn"], bos_token_id=1, eos_token_id=2)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    save_pretrained(GPT(config), tmp_path / "a", **kwargs)
    save_pretrained(load_pretrained(tmp_path / "a"), tmp_path / "b", **kwargs)
    files_a, config_a, tensors_a = read_dir(tmp_path / "a")
    files_b, config_b, tensors_b = read_dir(tmp_path / "b")
    assert files_a == files_b and config_a == config_b
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    if shard:
        index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        assert set(index["weight_map"]) == set(tensors_a)
        assert "model.safetensors" not in files_a
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
        input_ids = torch.randint(0, 96, (1, 12))
        torch.testing.assert_close(logits_of(hf, input_ids), logits_of(load_pretrained(tmp_path / "a"), input_ids),
                                   rtol=1e-5, atol=1e-5)


def test_reexport_replaces_stale_shards(tmp_path):
    """Re-exporting needs overwrite=True, and then the directory holds the new export only."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    save_pretrained(model, tmp_path, max_shard_size=20_000)
    sharded = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="already holds files; pass overwrite=True"):
        save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sharded
    save_pretrained(model, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # no staging directory left behind


def test_export_writes_generation_config_tokenizer_and_bf16(tmp_path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    config = tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model = GPT(config)
    save_pretrained(model, tmp_path, tokenizer=tokenizer, dtype=torch.bfloat16)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"eos_token_id": tokenizer.eos_token_id}
    assert AutoTokenizer.from_pretrained(tmp_path).encode("Emma Woodhouse") == tokenizer.encode("Emma Woodhouse")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
    for name, tensor in load_file(tmp_path / "model.safetensors").items():
        assert tensor.dtype == torch.bfloat16, name
    torch.testing.assert_close(hf.model.embed_tokens.weight, model.embed.weight.detach().bfloat16(), rtol=0, atol=0)


GREEDY_SCRIPT = """
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
print(json.dumps({"version": transformers.__version__, "tokenizer": type(tokenizer).__name__,
                  "ids": ids[0].tolist(), "text": tokenizer.decode(out[0])}))
"""


def greedy_in(path, oldest=None):
    """Tokenizer class, prompt ids and greedy text of an export, loaded by the transformers of
    this environment, or by the oldest supported one (a separate install put first on the path)."""
    env = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1")
    if oldest:
        env["PYTHONPATH"] = oldest
    out = subprocess.run([sys.executable, "-c", GREEDY_SCRIPT, str(path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_export_loads_in_the_oldest_and_newest_transformers(tmp_path):
    """An export (model, tokenizer, chat template) loads with transformers 4.46, the oldest that
    pyproject.toml admits, and with the newest: the same tokenizer ids and the same greedy text."""
    oldest = os.environ.get("FLASHLM_TRANSFORMERS_OLDEST")
    if not oldest:
        pytest.skip("FLASHLM_TRANSFORMERS_OLDEST is unset: scripts/test.sh installs transformers 4.46 and sets it")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = GPT(tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id))
    save_pretrained(model, tmp_path, tokenizer=tokenizer)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "is_local" not in config
    assert config["chat_template"] == tokenizer.chat_template
    new, old = greedy_in(tmp_path), greedy_in(tmp_path, oldest)
    assert old["version"].startswith("4.46.") and new["version"] == transformers.__version__
    assert old["tokenizer"] == "PreTrainedTokenizerFast"  # v5 loads the same file as its TokenizersBackend
    assert old["ids"] == new["ids"] == tokenizer("It is a truth universally acknowledged").input_ids
    assert old["text"] == new["text"]


# --- the export command ---------------------------------------------------------------------

def test_export_command_from_hf_directory(tmp_path, capsys):
    from flashlm.cli import main

    torch.manual_seed(0)
    save_pretrained(GPT(tiny_config()), tmp_path / "src", tokenizer=str(REPO / "data" / "tokenizer"))
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert "exported" in capsys.readouterr().out
    files, config, tensors = read_dir(tmp_path / "out")
    assert "tokenizer.json" in files and config["torch_dtype"] == "float16"
    _, _, source = read_dir(tmp_path / "src")
    for name in source:
        assert torch.equal(tensors[name], source[name].half()), name


def test_export_command_from_training_checkpoint(tmp_path):
    from safetensors.torch import save_model

    from flashlm.training.checkpoint import CheckpointManager
    from flashlm.cli import main

    torch.manual_seed(0)
    config = tiny_config()
    model = GPT(config)
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=1)
    save_model(model, str(manager.clear_staging(3) / "model.safetensors"))
    manager.commit(3, {"step": 3}, {"data": {"tokenizer": str(REPO / "data" / "tokenizer")}}, config.to_dict())
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    input_ids = torch.randint(0, 96, (1, 10))
    torch.testing.assert_close(logits_of(hf, input_ids), logits_of(model.eval(), input_ids), rtol=1e-5, atol=1e-5)


@pytest.fixture
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_export_command_reports_bad_sources(tmp_path, gpt2_dir, capsys):
    from flashlm.cli import main

    capsys.readouterr()
    for source, message in ((tmp_path / "nowhere", "does not exist"), (gpt2_dir, "model_type='gpt2'")):
        assert main(["export", str(source), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flashlm export: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_push_to_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from flashlm.hf.export import ExportArgs, main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    save_pretrained(GPT(tiny_config()), tmp_path / "src")
    with pytest.raises(RuntimeError, match="offline mode is on .* export in .* is complete"):
        main(ExportArgs(source=str(tmp_path / "src"), output_dir=str(tmp_path / "out"), push_to_hub="me/model"))
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --- bad checkpoints ------------------------------------------------------------------------

@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_non_llama_checkpoint_is_refused(gpt2_dir):
    with pytest.raises(UnsupportedCheckpointError, match="model_type='gpt2'"):
        load_pretrained(gpt2_dir)


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
])
def test_unsupported_llama_features_are_refused(llama_dir, changes, message):
    edit_config(llama_dir, **changes)
    with pytest.raises(UnsupportedCheckpointError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_pretrained(llama_dir)


def test_missing_weights_are_named(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained(llama_dir)


def test_extra_layers_are_unexpected(llama_dir):
    edit_config(llama_dir, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.1.input_layernorm.weight', .*9 in all"):
        load_pretrained(llama_dir)


def test_shape_mismatch_is_named(llama_dir):
    edit_config(llama_dir, intermediate_size=128)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), but config.json "
                                         r"implies \(128, 64\)"):
        load_pretrained(llama_dir)


def test_missing_files_are_named(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nowhere")
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*pytorch_model.bin"):
        load_pretrained(llama_dir)


def test_missing_shard_is_named(tmp_path):
    torch.manual_seed(0)
    save_pretrained(GPT(tiny_config()), tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard}"):
        load_pretrained(tmp_path)


def test_from_hf_config_fills_llama_defaults_and_reads_token_ids():
    minimal = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
               "intermediate_size": 96, "vocab_size": 96}
    config = from_hf_config(minimal)
    assert config.num_key_value_heads == 4 and config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-6
    assert config.rope_scaling is None and not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, None)
    config = from_hf_config({**minimal, "eos_token_id": [2, 5], "pad_token_id": -1})
    assert config.eos_token_id == [2, 5] and config.pad_token_id is None
    assert to_hf_config(config)["eos_token_id"] == [2, 5]


# --- flashlm's kernel inside transformers ---------------------------------------------------

def test_import_is_light_and_reading_the_name_registers():
    """`import flashlm` does not import transformers; reading HF_ATTN_IMPLEMENTATION registers the kernel."""
    code = ("import sys, flashlm; assert 'transformers' not in sys.modules; name = flashlm.HF_ATTN_IMPLEMENTATION; "
            "from transformers import AttentionInterface; from transformers.masking_utils import AttentionMaskInterface; "
            "assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_registered_attention_name_avoids_flash():
    name = flashlm.HF_ATTN_IMPLEMENTATION
    assert "flash" not in name
    from transformers import AttentionInterface

    assert name in AttentionInterface._global_mapping


def test_registered_attention_matches_sdpa(tmp_path):
    """A transformers Llama on flashlm's kernel against the same model on SDPA: plain, left-padded
    and packed batches, greedy generation with padding, and training gradients."""
    torch.manual_seed(0)
    tiny_llama(ROPE_SCALINGS["linear"]).save_pretrained(tmp_path)
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").to(DEVICE).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=flashlm.HF_ATTN_IMPLEMENTATION)
    ours = ours.to(DEVICE).eval()
    assert ours.config._attn_implementation == flashlm.HF_ATTN_IMPLEMENTATION
    assert sdpa.config._attn_implementation == "sdpa"

    input_ids = torch.randint(0, 96, (2, 13), device=DEVICE)
    padding = torch.ones(2, 13, dtype=torch.long, device=DEVICE)
    padding[0, :4] = 0
    packed = torch.cat([torch.arange(5), torch.arange(8)])[None].expand(2, -1).to(DEVICE)
    for kwargs, valid in (({}, None), ({"attention_mask": padding}, padding.bool()),
                          ({"position_ids": packed, "use_cache": False}, None)):
        expected, got = logits_of(sdpa, input_ids, **kwargs), logits_of(ours, input_ids, **kwargs)
        if valid is not None:  # outputs at padding positions are not defined
            expected, got = expected[valid], got[valid]
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), kwargs
    # The packed batch really is attended per document: it differs from one long sequence.
    assert (logits_of(ours, input_ids, position_ids=packed, use_cache=False) - logits_of(ours, input_ids)).abs().max() > 1e-3

    for cache in ("dynamic", "static"):  # a static cache leaves empty slots after the last query
        with torch.no_grad():
            generated = ours.generate(input_ids, attention_mask=padding, max_new_tokens=4, do_sample=False,
                                      cache_implementation=cache)
            reference = sdpa.generate(input_ids, attention_mask=padding, max_new_tokens=4, do_sample=False,
                                      cache_implementation=cache)
        assert torch.equal(generated, reference), cache

    for model in (sdpa, ours):
        model.train()
        model(input_ids, attention_mask=padding, labels=input_ids).loss.backward()
    for (name, p), q in zip(sdpa.named_parameters(), ours.parameters()):
        assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max(), name


def test_registered_attention_refuses_masks_it_cannot_express():
    torch.manual_seed(0)
    model = tiny_llama().to(DEVICE)
    model.set_attn_implementation(flashlm.HF_ATTN_IMPLEMENTATION)
    input_ids = torch.randint(0, 96, (1, 6), device=DEVICE)
    custom = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=DEVICE)  # a 4-D mask: bidirectional, not causal
    with pytest.raises(ValueError, match="cannot apply a 4-D attention mask"):
        model(input_ids, attention_mask=custom)


def test_mask_hook_reads_packing_and_refuses_other_patterns():
    from transformers import masking_utils as mu

    from flashlm.hf.attention import hf_attention_mask

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    packed = mu.find_packed_sequence_indices(position_ids)
    # transformers >= 5.2x also remaps positions within each sequence; earlier versions do not.
    remap = getattr(mu, "remap_positions_for_packed_sequence", lambda fn, _: fn)
    packed_fn = mu.and_masks(remap(mu.causal_mask_function, position_ids), mu.packed_sequence_mask_function(packed))
    args = dict(batch_size=2, q_length=9, kv_length=9, device="cpu")
    assert hf_attention_mask(mask_function=mu.causal_mask_function, **args) is None
    assert torch.equal(hf_attention_mask(mask_function=packed_fn, **args), packed)
    for refused in (mu.sliding_window_causal_mask_function(3), mu.bidirectional_mask_function):
        with pytest.raises(ValueError, match="supports causal attention with padding masks or packed sequences"):
            hf_attention_mask(mask_function=refused, **args)
