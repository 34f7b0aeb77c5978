"""Supervised fine-tuning on CPU: chat-template rendering, label masking, packing with document
boundaries, truncation counts, every bad input, greedy generation, the synthetic dataset, and a
few-step SFT recipe run that exports a model with its chat template.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import load_script
from flashlm.data import (
    DataConfig,
    DataError,
    build_eval_loader,
    build_train_loader,
    load_tokenizer,
    prepare_data,
    unigram_entropy,
)
from flashlm.hf import load_pretrained
from flashlm.data.chat import DEFAULT_CHAT_TEMPLATE, prompt_ids, read_records, tokenize_record, use_chat_template
from flashlm.model import IGNORE_INDEX
from flashlm.recipe import RecipeError, recipe_from_dict
from flashlm.training.evaluate import exact_match, greedy_generate

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "data" / "tokenizer")
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                     {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                     {"role": "assistant", "content": "8"}]}
PAIR = {"prompt": "Question: what is 2 + 3?\nAnswer:", "response": " 5"}


@pytest.fixture
def tok():
    return load_tokenizer(TOKENIZER)  # fresh: use_chat_template sets the template on it


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def labeled_text(tok, example):
    return tok.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


# --- rendering and label masking --------------------------------------------------------------

def test_default_chat_template_renders_and_masks_assistant_turns_only(tok):
    assert tok.chat_template is None
    assert use_chat_template(tok) is True and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert text == ("<|system|>\nBe brief.\n<|user|>\nWhat is 2 + 3?\n<|assistant|>\n5</s>"
                    "<|user|>\nAnd 4 + 4?\n<|assistant|>\n8</s>")
    example = tokenize_record(CHAT, "x:1", tok, True)
    assert tok.decode(example.input_ids) == text
    assert labeled_text(tok, example) == "5</s>8</s>"
    assert example.labels[0] == IGNORE_INDEX
    prompt = tok.decode(prompt_ids(CHAT, tok, True))
    assert prompt == text[:text.rindex("8</s>")]  # everything before the last answer


def test_tokenizer_and_recipe_templates_are_used(tok):
    """A tokenizer's own template wins over the default, and data.chat_template over both."""
    own = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
           "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    tok.chat_template = own
    assert use_chat_template(tok) is False and tok.chat_template == own
    example = tokenize_record({"messages": CHAT["messages"][1:3]}, "x:1", tok, False)
    assert tok.decode(example.input_ids) == "[user] What is 2 + 3?\n[assistant] 5</s>\n"
    assert labeled_text(tok, example).strip() == "5</s>"
    recipe_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}{% endif %}"
    assert use_chat_template(tok, recipe_template) is False and tok.chat_template == recipe_template


def test_prompt_response_pairs_mask_the_prompt(tok):
    example = tokenize_record(PAIR, "x:1", tok, True)
    prompt = tok(PAIR["prompt"])["input_ids"]
    assert example.input_ids.tolist() == prompt + tok(" 5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (example.labels[:len(prompt)] == IGNORE_INDEX).all()
    assert labeled_text(tok, example) == " 5</s>"
    assert prompt_ids(PAIR, tok, True) == prompt


def test_template_that_is_not_prefix_stable_is_refused(tok):
    # Renders the last message first: the text up to a turn is not a prefix of the whole.
    use_chat_template(tok, "{% for m in messages|reverse %}{{ m['content'] }};{% endfor %}")
    with pytest.raises(DataError, match=r"x:7: the chat template does not render this conversation turn by turn"):
        tokenize_record(CHAT, "x:7", tok, False)


# --- packing, splits and batches --------------------------------------------------------------

def sft_config(path, **overrides):
    return DataConfig(**{"path": str(path), "tokenizer": TOKENIZER, "kind": "sft", "seed": 0, **overrides})


def test_examples_pack_whole_with_boundaries_and_masked_padding(tmp_path, tok):
    records = [CHAT, PAIR] * 10
    data = prepare_data(sft_config(write_jsonl(tmp_path / "a.jsonl", records), eval_docs=4), tok, seq_len=96)
    assert data.n_examples == 20 and data.train.n_docs == 16 and data.eval.n_docs == 4
    lengths = sorted(len(tokenize_record(r, "", tok, True).input_ids) for r in records)
    for split in (data.train, data.eval):
        for row, starts, labels in zip(split.blocks, split.starts, split.labels):
            segments = np.split(np.arange(96), np.flatnonzero(starts)[1:])
            *examples, last = segments
            if labels[last].max() == IGNORE_INDEX and row[last[0]] == tok.pad_token_id:
                assert (row[last] == tok.pad_token_id).all()  # padding: its own segment, no loss
            else:
                examples.append(last)
            for seg in examples:
                assert len(seg) in lengths  # whole examples, never cut
                assert labels[seg[0]] == IGNORE_INDEX  # nothing predicts across an example boundary
                assert (labels[seg] != IGNORE_INDEX).any()
    batch = next(build_train_loader(data, batch_size=2))
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 96) and batch["labels"].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"][-1] == 192
    assert next(iter(build_eval_loader(data, batch_size=8)))["labels"].shape[1] == 96
    assert "20 examples, none truncated (truncation off); 16 train examples" in data.summary()
    answers = data.train.labels[data.train.labels != IGNORE_INDEX]  # what the SFT loss averages over
    p = np.unique(answers, return_counts=True)[1] / len(answers)
    assert unigram_entropy(data) == pytest.approx(float(-(p * np.log(p)).sum()))


def test_truncation_counts_cut_and_dropped_examples(tmp_path, tok):
    """With truncation, long examples are cut to seq_len and counted; one whose response is cut
    away entirely is dropped and counted too."""
    long_answer = {"prompt": "Say many words:", "response": " tea" * 40}
    long_prompt = {"prompt": "Read this: " + "cake " * 60, "response": " yes"}
    records = [PAIR, long_answer, PAIR, long_prompt, long_answer]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    data = prepare_data(sft_config(path, truncation=True), tok, seq_len=32)
    assert (data.n_examples, data.n_truncated, data.n_dropped) == (5, 3, 1)
    assert data.train.n_docs == 4
    assert "5 examples, 3 truncated to seq_len=32 (1 of them dropped: no response token left)" in data.summary()


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"a.jsonl:2: not valid JSON"),
    ('["prompt", "response"]', r"a.jsonl:2: expected a JSON object, got list"),
    ('{"text": "hi"}', r"a.jsonl:2: an example has either a 'messages' list or 'prompt' and 'response' strings; "
                       r"found keys \['text'\]"),
    ('{"prompt": "a", "response": 3}', r"a.jsonl:2: 'response' must be a string, got 3"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}',
     r"a.jsonl:2: message 0 has the unknown role 'bot'; the roles are system, user, assistant"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', r"a.jsonl:2: message 0 has content of type list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"a.jsonl:2: the conversation has no assistant message"),
    ('{"messages": []}', r"a.jsonl:2: 'messages' must be a non-empty list"),
], ids=["malformed-json", "not-object", "no-known-keys", "non-string", "unknown-role", "content-type",
        "no-assistant", "empty-messages"])
def test_bad_lines_name_file_and_line(tmp_path, tok, line, message):
    path = write_jsonl(tmp_path / "a.jsonl", [PAIR, line, PAIR])
    with pytest.raises(DataError, match=message):
        prepare_data(sft_config(path), tok, seq_len=64)


def test_overlong_example_without_truncation_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [PAIR, PAIR, {"prompt": "x " * 80, "response": " y"}])
    with pytest.raises(DataError, match=r"a.jsonl:3: the example is \d+ tokens long, more than the context "
                                        r"training.seq_len=32; .* set data.truncation: true"):
        prepare_data(sft_config(path), tok, seq_len=32)


@pytest.mark.parametrize("overrides, message", [
    ({"truncation": True}, "data.truncation=True is invalid: applies to kind: sft only"),
    ({"chat_template": "{{ x }}"}, "data.chat_template='{{ x }}' is invalid: applies to kind: sft only"),
    ({"kind": "sft", "streaming": True}, "data.streaming=True is invalid: is not supported for kind: sft"),
    ({"kind": "sft", "format": "parquet"}, "data.format='parquet' is invalid: must be 'jsonl'"),
])
def test_sft_settings_are_checked(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("{", r"\{")):
        DataConfig(path="x.jsonl", tokenizer=TOKENIZER, **overrides)


# --- generation and the shipped dataset -------------------------------------------------------

def test_greedy_generate_matches_one_prompt_at_a_time():
    from flashlm import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("debug", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                      attn_backend="sdpa"))
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10, 11, 12]]
    got = greedy_generate(model, prompts, max_new_tokens=5, eos_token_id=0)
    for prompt, answer in zip(prompts, got):
        ids = list(prompt)
        for _ in range(5):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == 0:
                break
            ids.append(nxt)
        assert answer == ids[len(prompt):]


def test_shipped_dataset_is_what_the_generator_makes(tmp_path):
    make_sft_data = load_script("data/make_sft_data")
    assert make_sft_data.main(["--out", str(tmp_path)]) == 0
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "sft" / name).read_bytes()
    train = {r["messages"][0]["content"] for r, _ in read_records([tmp_path / "train.jsonl"])}
    test = [r for r, _ in read_records([tmp_path / "test.jsonl"])]
    assert not train & {r["messages"][0]["content"] for r in test}  # held out
    assert {r["task"] for r in test} == set(make_sft_data.TASKS)


# --- the recipe -------------------------------------------------------------------------------

def sft_recipe(tmp_path, name, data_path, **sections):
    recipe = {
        "output_dir": str(tmp_path / name),
        "model": {"preset": "debug", "vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                  "attn_backend": "sdpa"},
        "data": {"kind": "sft", "path": str(data_path), "tokenizer": TOKENIZER, "eval_docs": 16, "seed": 0},
        "optim": {"lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"kind": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0},
        "training": {"steps": 4, "micro_batch_size": 4, "grad_accum_steps": 1, "seq_len": 128, "seed": 0,
                     "cpu": True, "mixed_precision": "no", "document_mask": True},
        "logging": {"progress_bar": False},
        "export": {"enabled": True},
    }
    for section, values in sections.items():  # "model" is replaced, other sections updated
        merge = section != "model" and isinstance(recipe.get(section), dict)
        recipe[section] = {**recipe[section], **values} if merge else values
    return recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe)))


def test_sft_requires_document_mask(tmp_path):
    with pytest.raises(RecipeError, match="training.document_mask=False is invalid: must be true for data.kind: sft"):
        sft_recipe(tmp_path, "run", "x.jsonl", training={"document_mask": False})


def test_sft_recipe_trains_exports_and_fine_tunes_again(tmp_path, capsys):
    """A few SFT steps on the shipped data lower the held-out loss on answers; the export carries
    the chat template and is scored by exact match; a second SFT run starts from that export."""
    from transformers import AutoTokenizer

    from flashlm.training.train import main

    lines = (REPO / "data" / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:160]
    data_path = write_jsonl(tmp_path / "train.jsonl", lines)
    summary = main(sft_recipe(tmp_path, "sft", data_path))
    out = capsys.readouterr().out
    assert "160 examples, none truncated (truncation off); 144 train examples" in out
    records = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]

    export = Path(summary["export_dir"])
    hf_tok = AutoTokenizer.from_pretrained(export)
    assert hf_tok.chat_template == DEFAULT_CHAT_TEMPLATE
    model = load_pretrained(export, attn_backend="sdpa")
    tests = read_records([REPO / "data" / "sft" / "test.jsonl"])[:6]
    accuracy, results = exact_match(model, hf_tok, tests, use_chat_template(hf_tok), max_new_tokens=4)
    assert 0 <= accuracy <= 1 and len(results) == 6 and results[0]["prompt"].endswith("<|assistant|>\n")

    again = sft_recipe(tmp_path, "again", data_path, init_from=str(export),
                       model={"attn_backend": "sdpa"}, training={"steps": 2})
    assert main(again)["step"] == 2
