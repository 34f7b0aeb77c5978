"""Train a byte-level BPE tokenizer on a local corpus and save it in Hugging Face format.

    python scripts/data/train_tokenizer.py --data data/corpus --vocab-size 4096 --out data/tokenizer

The folder it writes (``tokenizer.json``, ``tokenizer_config.json``, ...) loads with
``transformers.AutoTokenizer.from_pretrained`` and with ``flashlm.data.load_tokenizer``.
Special tokens: ``<s>`` (bos), ``</s>`` (eos, put between packed documents) and ``<pad>``.
The tokenizer adds no special token by itself: the data pipeline appends EOS to each
document, and generation starts from the prompt's own tokens.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flashlm.data import iter_texts

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


@dataclass(kw_only=True)
class TokenizerConfig:
    data: str
    out: str
    vocab_size: int
    min_frequency: int = 2
    format: str = "auto"
    text_field: str = "text"
    model_max_length: int = 1 << 20

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={self.vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} "
                             "(the 256 byte tokens and the special tokens)")


def train(cfg: TokenizerConfig):
    """Train the BPE merges on every document under ``cfg.data``; returns the fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(cfg.data, format=cfg.format, text_field=cfg.text_field), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=cfg.model_max_length, **SPECIAL_TOKENS)


def main(cfg: TokenizerConfig):
    fast = train(cfg)
    fast.save_pretrained(cfg.out)
    # transformers 5 names its own backend class here; the generic name loads in 4.x too.
    config_path = Path(cfg.out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (Path(cfg.out) / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    print(f"saved a {len(fast)}-token byte-level BPE tokenizer to {cfg.out}")


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="corpus file, folder or glob")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    main(TokenizerConfig(**{k: v for k, v in vars(args).items()}))


if __name__ == "__main__":
    cli()
