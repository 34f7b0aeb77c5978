"""Hugging Face conversion: export to and import from ``LlamaForCausalLM`` directories.

Export writes a self-contained directory that ``AutoModelForCausalLM.from_pretrained`` loads as a
plain Llama with no custom code: ``config.json`` (with both transformers v5's ``rope_parameters``
and the legacy ``rope_theta``/``rope_scaling`` keys that v4 reads), ``model.safetensors`` (sharded
with an index past ``max_shard_size``), ``generation_config.json`` and the tokenizer files.
Tensor names follow the declared ``HF_NAME_MAP``; the values are copied as they are, since
flashlm uses transformers' RoPE layout.

A model with a ``sliding_window`` is exported as ``MistralForCausalLM`` instead: Mistral is Llama
plus that window, with the same tensor names and numerics, and transformers applies the window.

Import reads any local Llama- or Mistral-architecture directory with safetensors weights and
refuses, naming the cause, what flashlm cannot represent exactly.
"""

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from flashlm.model import GPT
from flashlm.model.config import ROPE_SCALING_KEYS, GPTConfig
from flashlm.training.rundir import holds_training_state

logger = logging.getLogger(__name__)

# flashlm parameter name -> transformers LlamaForCausalLM name; "{i}" is the layer index.
HF_NAME_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# transformers' LlamaConfig defaults, for keys a config.json leaves out.
_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
    "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "head_dim": None,
    "rope_theta": 10000.0,
}
# Keys of LlamaConfig that MistralConfig does not have (Mistral never has these biases).
_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_INDEX = "model.safetensors.index.json"
_TOKENIZER_LOADER_STATE = ("is_local", "local_files_only", "_commit_hash", "name_or_path")


class UnsupportedCheckpointError(ValueError):
    """A checkpoint that flashlm cannot load exactly; the message names the reason."""


def hf_names(config):
    """(flashlm name, transformers name) for every tensor of ``config``'s checkpoint; a tied LM
    head is stored once, as the embedding."""
    per_layer = [(ours, theirs) for ours, theirs in HF_NAME_MAP.items() if "{i}" in ours]
    pairs = [("embed.weight", HF_NAME_MAP["embed.weight"])]
    for i in range(config.num_hidden_layers):  # layer by layer, so that a shard holds whole layers
        pairs += [(ours.format(i=i), theirs.format(i=i)) for ours, theirs in per_layer]
    pairs.append(("norm.weight", HF_NAME_MAP["norm.weight"]))
    if not config.tie_word_embeddings:
        pairs.append(("lm_head.weight", HF_NAME_MAP["lm_head.weight"]))
    return pairs


def to_hf_config(config, dtype=torch.float32):
    """``config.json`` contents for ``config`` as a transformers ``LlamaForCausalLM``, or as a
    ``MistralForCausalLM`` when ``config.sliding_window`` is set (Llama has no window)."""
    rope_parameters = {**(config.rope_scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta}
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope_parameters,
        # transformers v4 reads these two; v5 reads rope_parameters (and accepts these too).
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else dict(config.rope_scaling),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if config.sliding_window is None:
        return values
    for key in _LLAMA_ONLY_KEYS:
        del values[key]
    return {**values, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "sliding_window": config.sliding_window}


def from_hf_config(values, **overrides):
    """A ``GPTConfig`` from a transformers Llama or Mistral ``config.json`` dict (v4 or v5 keys).

    Raises UnsupportedCheckpointError for another architecture or a feature flashlm does not
    implement (biases, another activation, an explicit head_dim, other RoPE types, quantization,
    per-layer window patterns).
    """
    model_type = values.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"config.json has model_type={model_type!r}; flashlm loads Llama-architecture checkpoints "
            "(model_type 'llama', or 'mistral' for Llama with a sliding window)")
    architectures = values.get("architectures") or [_ARCHITECTURES[model_type]]
    if architectures != [_ARCHITECTURES[model_type]]:
        raise UnsupportedCheckpointError(
            f"config.json has architectures={architectures}; flashlm loads causal language models "
            f"({_ARCHITECTURES[model_type]})")
    if values.get("layer_types") and len(set(values["layer_types"])) > 1:
        raise UnsupportedCheckpointError(f"config.json has layer_types={values['layer_types']}; flashlm applies "
                                         "one attention pattern (full or one sliding window) to every layer")
    get = {**_LLAMA_DEFAULTS, **values}.get
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if get(key) != supported:
            raise UnsupportedCheckpointError(f"config.json has {key}={get(key)!r}; flashlm supports only {supported!r}")
    if values.get("quantization_config"):
        raise UnsupportedCheckpointError("config.json has a quantization_config; flashlm loads unquantized weights only")
    heads = get("num_attention_heads")
    if get("head_dim") not in (None, get("hidden_size") // heads):
        raise UnsupportedCheckpointError(
            f"config.json has head_dim={get('head_dim')}, but flashlm derives head_dim = hidden_size / "
            f"num_attention_heads = {get('hidden_size') // heads}")
    if get("attention_dropout"):
        logger.warning("config.json has attention_dropout=%s; flashlm has no attention dropout and ignores it",
                       get("attention_dropout"))
    rope_theta, rope_scaling = _rope_from_hf(values, get("max_position_embeddings"))
    token_ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = get(key) if isinstance(get(key), list) else [get(key)]
        if all(i is None or 0 <= i < get("vocab_size") for i in ids):
            token_ids[key] = get(key)
        else:  # e.g. pad_token_id=-1 in some older Llama configs
            logger.warning("config.json has %s=%s outside the vocabulary; flashlm leaves it unset", key, get(key))
            token_ids[key] = None
    fields = dict(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads") or heads,
        intermediate_size=get("intermediate_size"), rms_norm_eps=get("rms_norm_eps"), rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=get("tie_word_embeddings"), initializer_range=get("initializer_range"),
        sliding_window=values.get("sliding_window") if model_type == "mistral" else None, **token_ids,
    )
    return GPTConfig.from_dict({**fields, **overrides})


def _rope_from_hf(values, max_position_embeddings):
    # transformers v5 takes the scaling dict from rope_scaling when set, else rope_parameters,
    # and rope_theta from that dict before the top-level key.
    params = dict(values.get("rope_scaling") or values.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedCheckpointError("config.json has per-layer-type RoPE parameters; flashlm supports one RoPE")
    rope_theta = float(params.pop("rope_theta", values.get("rope_theta", _LLAMA_DEFAULTS["rope_theta"])))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", values.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UnsupportedCheckpointError(f"config.json has partial_rotary_factor={partial}; flashlm rotates the whole head")
    if rope_type == "default":
        return rope_theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise UnsupportedCheckpointError(
            f"config.json has RoPE scaling rope_type={rope_type!r}; flashlm supports {sorted(ROPE_SCALING_KEYS)}")
    if rope_type == "llama3":
        # transformers fills this in the same way when a llama3 config leaves it out.
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rope_theta, {"rope_type": rope_type, **params}


def save_pretrained(model, save_directory, tokenizer=None, dtype=None, max_shard_size="5GB", overwrite=False):
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` directory (``MistralForCausalLM`` with a window).

    Args:
        model: a ``flashlm.GPT``.
        save_directory: created if needed. A directory that holds anything is refused unless
            ``overwrite``, and then replaced as a whole; a flashlm run or checkpoint directory
            (or anything inside one) is always refused. The export is written into a temporary
            sibling directory and renamed into place when complete, so an interrupted export
            leaves the destination as it was.
        tokenizer: optional; an object with ``save_pretrained`` (a transformers tokenizer) or a path
            or hub name that ``AutoTokenizer`` loads. Its files are written next to the model.
        dtype: weight dtype on disk (default: the model's parameter dtype).
        max_shard_size: bytes (int) or a string such as "5GB" or "500MiB"; larger models are split
            into ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
        overwrite: replace a destination that already holds files.

    Returns:
        The directory as a Path.
    """
    final = Path(save_directory)
    check_export_destination(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        _write_export(model, directory, tokenizer, dtype, max_shard_size)
        directory.chmod(0o755)
        if final.exists():
            old = directory.with_suffix(".old")
            os.rename(final, old)
            os.rename(directory, final)
            shutil.rmtree(old)
        else:
            os.rename(directory, final)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return final


def check_export_destination(directory, overwrite=False):
    """Raise unless ``save_pretrained`` may write ``directory``: never a flashlm run or
    checkpoint directory (or anything inside one), and a directory holding files only with
    ``overwrite``."""
    directory = Path(directory)
    if holds_training_state(directory):
        raise ValueError(f"{directory} is a flashlm run or checkpoint directory (or inside one); export into a "
                         "directory of its own")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} already holds files; pass overwrite=True (flashlm export --overwrite) "
                              "to replace them, or export into a new directory")


def _write_export(model, directory, tokenizer, dtype, max_shard_size):
    from safetensors.torch import save_file

    config = model.config
    dtype = dtype or model.embed.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype} is not supported for export; use one of {list(_DTYPE_NAMES)}")
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "yarn" and "original_max_position_embeddings" in scaling:
        implied = config.max_position_embeddings / scaling["original_max_position_embeddings"]
        if implied != scaling["factor"]:
            logger.warning("yarn factor=%s differs from max_position_embeddings / original_max_position_embeddings = "
                           "%s, which transformers v4 uses instead: v4 and v5 will compute different RoPE",
                           scaling["factor"], implied)
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {theirs: params[ours].detach().to(device="cpu", dtype=dtype).contiguous()
               for ours, theirs in hf_names(config)}
    shards = _shard(tensors, _parse_size(max_shard_size))
    if len(shards) == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, names in enumerate(shards, 1):
            filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: tensors[name] for name in names}, directory / filename, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, filename))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(directory / _INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(directory / "config.json", to_hf_config(config, dtype))
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(directory / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        tokenizer.save_pretrained(directory)
        _portable_tokenizer_config(directory)


def _portable_tokenizer_config(directory):
    """Make the saved ``tokenizer_config.json`` load in transformers 4 as well as 5.

    transformers 5 names its tokenizer class ``TokenizersBackend`` (a class 4.x lacks, so its
    ``AutoTokenizer`` fails) and records loader state (``is_local``, ``local_files_only``); its
    chat template may sit in ``chat_template.jinja``, which 4.x before 4.50 does not read. The
    fast-tokenizer class both majors know, without the loader state, and the template inline.
    """
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in _TOKENIZER_LOADER_STATE:
        config.pop(key, None)
    template = directory / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
    _write_json(path, config)


def load_pretrained(directory, **overrides):
    """A ``flashlm.GPT`` (fp32, CPU) with the weights of a local Hugging Face Llama directory.

    Reads ``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
    ``overrides`` replace GPTConfig fields. Raises UnsupportedCheckpointError for what flashlm cannot
    represent, and ValueError for missing, unexpected or mis-shaped tensors.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; expected a Hugging Face model directory")
    config = from_hf_config(json.loads(config_path.read_text(encoding="utf-8")), **overrides)
    tensors = _read_safetensors(directory)
    # Old checkpoints stored RoPE tables; flashlm recomputes them from the config.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    pairs = hf_names(config)
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(head, embed):
            logger.warning("%s: tie_word_embeddings is true, so lm_head.weight (which differs from the embedding) "
                           "is ignored, as transformers does", directory)
    missing = [theirs for _, theirs in pairs if theirs not in tensors]
    unexpected = sorted(set(tensors) - {theirs for _, theirs in pairs})
    if missing or unexpected:
        raise ValueError(f"{directory}: the weights do not match config.json "
                         f"({config.num_hidden_layers} layers, tie_word_embeddings={config.tie_word_embeddings}): "
                         f"missing {_some(missing)}, unexpected {_some(unexpected)}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in pairs:
            tensor, param = tensors[theirs], params[ours]
            if tensor.shape != param.shape:
                raise ValueError(f"{directory}: tensor {theirs} has shape {tuple(tensor.shape)}, but config.json "
                                 f"implies {tuple(param.shape)} for it")
            if not tensor.is_floating_point():
                raise UnsupportedCheckpointError(f"{directory}: tensor {theirs} has dtype {tensor.dtype}; "
                                                 "flashlm loads floating-point weights only")
            param.copy_(tensor)
    return model


def _read_safetensors(directory):
    from safetensors import safe_open

    if (directory / _INDEX).is_file():
        weight_map = json.loads((directory / _INDEX).read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = f" (found {other}: convert them to safetensors first)" if other else ""
        raise FileNotFoundError(f"{directory} has no model.safetensors or {_INDEX}{hint}")
    tensors = {}
    for filename in files:
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: {_INDEX} lists the shard {filename}, which does not exist")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    if weight_map is not None:
        misplaced = [name for name in weight_map if name not in tensors]
        if misplaced:
            raise ValueError(f"{directory}: {_INDEX} lists tensors its shards do not hold: {_some(misplaced)}")
    return tensors


def push_to_hub(directory, repo_id, private=None, token=None):
    """Upload an exported directory to the Hugging Face Hub repository ``repo_id``."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"cannot push to the Hugging Face Hub repository {repo_id!r}: offline mode is on "
                           f"(HF_HUB_OFFLINE). The export in {directory} is complete; push it later.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(directory),
                                 commit_message="Upload model exported by flashlm")
    except Exception as e:
        raise RuntimeError(f"could not push {directory} to the Hugging Face Hub repository {repo_id!r}: "
                           f"{type(e).__name__}: {e}. Check the network and your login (`hf auth login`); "
                           f"the export in {directory} is complete.") from e


def _shard(tensors, max_bytes):
    shards, current, size = [], [], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def _parse_size(size):
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is invalid: expected bytes or a size such as '5GB' or '500MiB'")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** ("KMGT".index(unit[0]) + 1))


def _atomic(path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_json(path, data):
    _atomic(path, lambda p: Path(p).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def _some(names, limit=6):
    return "[]" if not names else str(names[:limit])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > limit else "]")
