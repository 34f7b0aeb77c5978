"""Training data: load a corpus through ``datasets``, tokenize it once, pack it into batches.

Public API::

    cfg = DataConfig(path="data/corpus", tokenizer="data/tokenizer", eval_fraction=0.05,
                     seed=0, cache_dir=".cache/data")
    tok = load_tokenizer(cfg.tokenizer)            # transformers.PreTrainedTokenizerFast
    check_tokenizer_fits(tok, model_cfg.vocab_size) # DataError if len(tok) > vocab_size
    data = prepare_data(cfg, tok, seq_len=256)      # PackedData, or StreamingData if streaming
    print(data.summary())                           # documents, tokens, blocks, cache hit or not
    h = unigram_entropy(data)                       # nats/token of the training tokens
    train = build_train_loader(data, batch_size=8, rank=0, world_size=1)
    batch = next(train)                             # infinite, deterministic given cfg.seed
    state = train.state_dict()                      # plain ints: put it in checkpoints
    train.load_state_dict(state)                    # next(train) is the batch after `state`
    for batch in build_eval_loader(data, batch_size=8, rank=0, world_size=1):
        ...                                         # finite, the same batches on every pass
    iter_texts("data/corpus")                       # the raw document strings (tokenizer training)

The path is one-way: ``sources`` (files, hub) -> ``tokenizer`` -> ``documents`` (tokenized and
cached) or ``chat`` (SFT examples) -> ``packing`` (both into the same packed batch) -> ``loader``.

``DataConfig`` (the recipe's ``data`` section, in ``flashlm.recipe``) fields: ``path`` (file,
folder or glob; or a hub dataset name with ``format="hub"``), ``tokenizer`` (tokenizer.json, tokenizer folder or hub name), ``format``
("auto" | "text" | "jsonl" | "parquet" | "arrow" | "hub"), ``text_field``, ``sample_by``
(text files: "document" = one document per file, "paragraph", "line"), ``eval_fraction`` or
``eval_docs`` (held-out documents, chosen before packing), ``streaming``, ``shuffle_buffer``
(streaming only, in blocks), ``cache_dir`` (None turns the token cache off), ``seed``,
``num_proc``, ``hub_config``, ``hub_split``, ``min_doc_tokens`` (training documents shorter than
this are left out: long-context stages), ``retrieval_share`` (the share of training blocks given
a synthetic long-range retrieval: ``flashlm.data.retrieval``), ``retrieval_kind`` (its form) and
``retrieval_max_spans`` (span copies a planted block gets at most), ``retrieval_cue_tokens`` and
``retrieval_unique_cue`` (random_spans: a cue's length). ``kind="sft"`` reads instruction examples
instead of documents (``flashlm.data.chat``, with its own ``truncation`` and ``chat_template``).

Batches and their keys: ``flashlm.data.packing``.

Splits and order: without streaming, documents are held out at random (seeded) before
packing; the training documents are packed in a seeded order and every epoch visits the
blocks in a new seeded order, each rank taking a disjoint stride of it. With streaming,
the first ``eval_docs`` documents of the stream are held out, document ``i`` after them goes
to rank ``i % world_size``, and blocks pass through a seeded shuffle buffer.

Errors (``DataError``, a ``ValueError``) are raised before training and name the problem:
missing or empty data files, a jsonl line without the text field (file and line), text that
is not UTF-8 (file), a tokenizer larger than the model's vocabulary, a corpus too small for
one batch per rank. Finding and validating files is ``flashlm.data.sources``'s job; with
streaming, a bad line past the held-out documents is found when the stream reaches it.
"""

from flashlm.data.loader import build_eval_loader, build_train_loader
from flashlm.data.packing import PackedData, SFTData, StreamingData, make_batch, prepare_data, unigram_entropy
from flashlm.data.sources import DataError, iter_texts
from flashlm.data.tokenizer import check_tokenizer_fits, load_tokenizer
from flashlm.recipe import DataConfig

__all__ = [
    "DataConfig", "DataError", "PackedData", "SFTData", "StreamingData", "build_eval_loader", "build_train_loader",
    "check_tokenizer_fits", "iter_texts", "load_tokenizer", "make_batch", "prepare_data", "unigram_entropy",
]
