"""Training data: load a corpus through ``datasets``, tokenize it once, pack it into blocks.

Public API::

    cfg = DataConfig(path="data/corpus", tokenizer="data/tokenizer", eval_fraction=0.05,
                     seed=0, cache_dir=".cache/data")
    tok = load_tokenizer(cfg.tokenizer)            # transformers.PreTrainedTokenizerFast
    check_tokenizer_fits(tok, model_cfg.vocab_size) # ValueError if len(tok) > vocab_size
    data = prepare_data(cfg, tok, seq_len=256)      # PackedData (or StreamingData if streaming)
    h = unigram_entropy(data)                       # nats/token of the packed training tokens
    train = build_train_loader(data, batch_size=8, rank=0, world_size=1)
    batch = next(train)                             # infinite, deterministic given cfg.seed
    state = train.state_dict()                      # {"epoch", "batch", ...}: put it in checkpoints
    train.load_state_dict(state)                    # the next batch is the one after `state`
    for batch in build_eval_loader(data, batch_size=8, rank=0, world_size=1):
        ...                                         # finite, same batches on every pass

``DataConfig`` fields (kw_only): ``path`` (file, folder or glob; or a hub dataset name),
``format`` ("auto" | "text" | "jsonl" | "parquet" | "arrow" | "hub"), ``text_field``,
``sample_by`` (for text files: "document" = one document per file, "paragraph", "line"),
``tokenizer`` (tokenizer.json, tokenizer folder or hub name), ``eval_fraction`` or
``eval_docs`` (held-out documents, chosen before packing), ``streaming``, ``cache_dir``
(None disables the on-disk token cache), ``seed``, ``num_proc``, ``hub_name``/``hub_split``.

Packing: every document is tokenized without special tokens and followed by one EOS token,
which belongs to the document it ends. The documents are concatenated into one stream and
cut into blocks of ``seq_len`` tokens; the final partial block is dropped. A document cut by
a block edge continues in the next block as a new segment starting at position 0.

A batch is a dict (B = batch_size, S = seq_len)::

    input_ids     (B, S) int64  token ids; the model shifts them for next-token targets
    position_ids  (B, S) int64  0 at the start of every segment (document piece) in a row
    doc_ids       (B, S) int64  segment index within its row: 0, 0, ..., 1, 1, ..., 2, ...
    cu_seqlens    (N+1,) int32  FlashAttention varlen offsets of the N segments of the whole
                                batch flattened to B*S tokens (rows never share a segment)
    max_seqlen    int           longest segment in the batch

``position_ids`` restart inside a row, so they are meant for document-masked attention
(``doc_ids`` / ``cu_seqlens``); a model that attends across documents should use
``arange(S)`` positions instead.

Errors raised before training, each naming the problem: missing or empty data files, a
jsonl line without the text field (file and line), text that is not UTF-8 (file), a
tokenizer larger than the model's vocabulary (``check_tokenizer_fits``), and a corpus too
small for one batch per rank.
"""
