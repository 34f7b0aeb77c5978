"""Training recipes: typed, validated configuration for ``flashlm train``.

A recipe is a YAML file with one mapping per section::

    output_dir: runs/debug_cpu
    model:    {preset: debug, attn_backend: sdpa}   # a GPTConfig preset plus field overrides
    data:     {path: data/corpus, tokenizer: data/tokenizer, ...}   # DataConfig
    optim:    {lr: 3.0e-3, weight_decay: 0.1, grad_clip: 1.0}
    schedule: {kind: cosine, warmup_steps: 20, min_lr_ratio: 0.1}
    training: {steps: 300, micro_batch_size: 16, grad_accum_steps: 1, seq_len: 128, seed: 0}
    logging:  {trackers: [tensorboard]}
    export:   {enabled: true}

``load_recipe(path, overrides)`` reads the file, applies command-line overrides
(``--section.key=value``, or ``--key=value`` when ``key`` names one field in one section),
and builds a ``Recipe``. Strings are coerced to each field's declared type. An unknown key,
a value of the wrong type, or a missing required field is a ``RecipeError`` that names the
key and lists the valid ones. The hyperparameters that define a run have no defaults: they
live in the recipe, and the resolved recipe is saved with every run and checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flashlm.model.config import GPTConfig
from flashlm.validation import ConfigError, invalid


class RecipeError(ConfigError):
    """A recipe or override that cannot be turned into a valid ``Recipe``."""


@dataclass(kw_only=True)
class ModelRecipe:
    """Which model to build: a ``GPTConfig`` preset, with field overrides.

    In YAML the overrides sit beside ``preset`` (``model: {preset: debug, rope_theta: 1e5}``)
    and are checked against ``GPTConfig``'s fields. With ``init_from`` the architecture comes
    from the source checkpoint, so ``preset`` is left out and the overrides are applied to it.
    """

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return ({"preset": self.preset} if self.preset is not None else {}) | self.overrides


@dataclass(kw_only=True)
class DataConfig:
    """Where the corpus is, how to read and tokenize it, and how to split it."""

    path: str
    tokenizer: str
    format: Literal["auto", "text", "jsonl", "parquet", "arrow", "hub"] = "auto"
    text_field: str = "text"
    sample_by: Literal["document", "paragraph", "line"] = "document"
    eval_fraction: float = 0.0
    eval_docs: int | None = None  # a count of held-out documents; overrides eval_fraction
    streaming: bool = False
    shuffle_buffer: int = 1024
    cache_dir: str | None = ".cache/data"
    seed: int = 0
    num_proc: int = 1  # datasets.map processes; the Rust tokenizer is multithreaded already
    hub_config: str | None = None
    hub_split: str = "train"
    kind: Literal["text", "sft"] = "text"  # sft: instruction examples, see flashlm.data.chat
    truncation: bool = False  # sft: cut an example longer than seq_len (and count it) instead of failing
    chat_template: str | None = None  # sft: a Jinja chat template replacing the tokenizer's own
    # Training documents shorter than this many tokens (EOS included) are left out; the held-out
    # split keeps them. A long-context stage sets its seq_len, so a block is mostly one document.
    min_doc_tokens: int = 0
    # The share of training blocks given a synthetic long-range retrieval (flashlm.data.retrieval):
    # facts at random depths in a document and a question about one of them at its end
    # (retrieval_kind: facts), or copies of random spans of it later in it (retrieval_kind: spans;
    # random_spans: past a cue of the document's tokens, the sources filled with random tokens; the
    # ladder's choice).
    retrieval_share: float = 0.0
    retrieval_kind: Literal["facts", "spans", "random_spans"] = "facts"
    # spans, random_spans: each planted block gets 1 to this many copies (uniformly). A long
    # block with few copies gives little practice at long distances: 128K tokens and 4 copies
    # is one copy per 32K tokens, where a 4K block gets one per 1.6K.
    retrieval_max_spans: int = 4
    # random_spans: a cue is this many of the document's tokens (a [min, max] range, drawn per
    # span) kept before a source's random tokens; the copy's first random token is predictable
    # only by finding the cue's earlier occurrence, so a cue that is not unique in the block
    # teaches nothing there.
    retrieval_cue_tokens: tuple[int, int] = (2, 6)
    # random_spans: each cue is the shortest length in that range whose tokens occur nowhere
    # else in the block before the copy (in code, 2-6 tokens often recur), instead of a length
    # drawn from it.
    retrieval_unique_cue: bool = False

    def __post_init__(self):
        _check(bool(self.path), "data.path", self.path, "must name a file, folder, glob or hub dataset")
        _check(bool(self.tokenizer), "data.tokenizer", self.tokenizer, "must name a tokenizer")
        formats = ("auto", "text", "jsonl", "parquet", "arrow", "hub")
        _check(self.format in formats, "data.format", self.format, f"must be one of {formats}")
        _check(self.sample_by in ("document", "paragraph", "line"), "data.sample_by", self.sample_by,
               "must be 'document', 'paragraph' or 'line'")
        _check(bool(self.text_field), "data.text_field", self.text_field, "must name a field")
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _check(self.eval_docs is None or self.eval_docs >= 0, "data.eval_docs", self.eval_docs, "must be >= 0")
        _check(not (self.streaming and self.eval_fraction > 0), "data.eval_fraction", self.eval_fraction,
               "cannot be used with streaming (the stream's length is unknown); set eval_docs")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        _check(self.num_proc >= 1, "data.num_proc", self.num_proc, "must be >= 1")
        _check(self.kind in ("text", "sft"), "data.kind", self.kind, "must be 'text' or 'sft'")
        _check(self.min_doc_tokens >= 0, "data.min_doc_tokens", self.min_doc_tokens, "must be >= 0")
        _check(self.min_doc_tokens == 0 or (self.kind == "text" and not self.streaming), "data.min_doc_tokens",
               self.min_doc_tokens, "applies to kind: text without streaming only")
        _check(0.0 <= self.retrieval_share <= 1.0, "data.retrieval_share", self.retrieval_share, "must be in [0, 1]")
        _check(self.retrieval_share == 0 or (self.kind == "text" and not self.streaming), "data.retrieval_share",
               self.retrieval_share, "applies to kind: text without streaming only")
        _check(self.retrieval_kind in ("facts", "spans", "random_spans"), "data.retrieval_kind", self.retrieval_kind,
               "must be 'facts', 'spans' or 'random_spans'")
        spans = self.retrieval_max_spans
        _check(isinstance(spans, int) and not isinstance(spans, bool) and spans >= 1, "data.retrieval_max_spans",
               spans, "must be a whole number >= 1")
        from flashlm.data.retrieval import cue_tokens_problem  # here: flashlm.data imports this module

        problem = cue_tokens_problem(self.retrieval_cue_tokens)
        _check(problem is None, "data.retrieval_cue_tokens", list(self.retrieval_cue_tokens), problem)
        if self.kind == "text":
            _check(not self.truncation, "data.truncation", self.truncation, "applies to kind: sft only")
            _check(self.chat_template is None, "data.chat_template", self.chat_template, "applies to kind: sft only")
        else:
            _check(self.format in ("auto", "jsonl"), "data.format", self.format, "must be 'jsonl' (or 'auto') for kind: sft")
            _check(not self.streaming, "data.streaming", self.streaming, "is not supported for kind: sft")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW. Weight decay applies to matrices and embeddings, not to norm weights."""

    lr: float
    weight_decay: float
    grad_clip: float  # max global grad norm; 0 disables clipping
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self):
        # Every range torch.optim.AdamW itself refuses is refused here, before anything runs, and
        # non-finite values (which AdamW accepts and then trains to NaN) too.
        _check(0 < self.lr < math.inf, "optim.lr", self.lr, "must be a finite number > 0")
        _check(0 <= self.weight_decay < math.inf, "optim.weight_decay", self.weight_decay,
               "must be a finite number >= 0")
        _check(0 <= self.grad_clip <= math.inf, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        _check(0 < self.eps < 1, "optim.eps", self.eps, "must be in (0, 1)")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Linear warmup to ``optim.lr``, then ``cosine`` decay to ``min_lr_ratio * lr`` at the last
    step, ``wsd`` (warmup-stable-decay: constant, then a linear decay over the final
    ``decay_fraction`` of the steps), or ``constant``."""

    kind: Literal["cosine", "wsd", "constant"]
    warmup_steps: int
    min_lr_ratio: float
    decay_fraction: float = 0.2

    def __post_init__(self):
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(0 < self.decay_fraction <= 1, "schedule.decay_fraction", self.decay_fraction, "must be in (0, 1]")


@dataclass(kw_only=True)
class TrainingConfig:
    """Steps, batch geometry, evaluation and checkpoint cadence.

    One optimizer step consumes ``micro_batch_size * grad_accum_steps * seq_len`` tokens per
    process. ``stop_at_step`` ends the run early as if it were interrupted there, with the
    schedule still spanning ``steps``; a later ``--resume`` continues it.
    """

    steps: int
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    seed: int
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 on GPU, none on CPU
    cpu: bool = False  # train on CPU even when a GPU is present
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    eval_batches: int | None = None  # None: the whole held-out split
    ckpt_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2
    stop_at_step: int | None = None
    # Attend within documents only: the packed batches' boundaries (cu_seqlens) and per-document
    # positions go to the model (flash: varlen kernel; sdpa/eager: a block-diagonal mask).
    document_mask: bool = False
    # A step whose loss or gradient norm is NaN or infinite: "stop" (exit non-zero, naming the
    # step, the value and the last good checkpoint) or "skip" (no update; after max_skipped_steps
    # skipped steps in one run, stop).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    # Bit-for-bit reproducible steps (a resumed run then matches an uninterrupted one exactly):
    # torch.use_deterministic_algorithms(True) for the run, which also switches flash attention
    # (model.attention_deterministic: auto) to its deterministic backward. Off: the faster
    # non-deterministic kernels where they exist.
    deterministic: bool = False
    # Run each micro-batch as this many equal sub-batches, forward and backward one after
    # another, their gradients accumulating: less activation memory per pass, the same step to
    # fp32 rounding. "auto": the plan of model.gradient_checkpointing "auto" picks it
    # (flashlm.model.plan.plan_split), otherwise 1. Not with document_mask. Default 1: on the
    # H100 the planned split ran slower than the whole batch in the same memory (1b at 4K and
    # 8K: 0.95x and 0.83x; results/memory/experiments/split_planned_1b_4k_16k_2d321da.md).
    micro_batch_split: int | Literal["auto"] = 1

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "seq_len", "keep_last"):
            _check(getattr(self, name) >= 1, f"training.{name}", getattr(self, name), "must be >= 1")
        for name in ("eval_every", "ckpt_every", "max_skipped_steps"):
            _check(getattr(self, name) >= 0, f"training.{name}", getattr(self, name), "must be >= 0")
        if self.eval_batches is not None:
            _check(self.eval_batches >= 1, "training.eval_batches", self.eval_batches, "must be >= 1 or null")
        split = self.micro_batch_split
        if split != "auto":
            _check(isinstance(split, int) and not isinstance(split, bool) and split >= 1
                   and self.micro_batch_size % split == 0, "training.micro_batch_split", split,
                   f"must be 'auto' or a whole number >= 1 that divides training.micro_batch_size="
                   f"{self.micro_batch_size}")
            _check(split == 1 or not self.document_mask, "training.micro_batch_split", split,
                   "must be 1 or 'auto' with training.document_mask (the documents' boundaries span the rows)")
        if self.stop_at_step is not None:
            _check(
                1 <= self.stop_at_step <= self.steps, "training.stop_at_step", self.stop_at_step,
                f"must be in [1, training.steps={self.steps}]",
            )


@dataclass(kw_only=True)
class ParallelConfig:
    """How the processes of a launch split the work beyond data parallelism.

    ``context_parallel_size`` processes share each sequence (context parallelism,
    ``flashlm.parallel``): each holds ``seq_len / context_parallel_size`` of its tokens, and
    attention runs over the whole sequence with ``context_parallel_impl`` ("ring", "allgather"
    or "ulysses"). The data-parallel size is the number of processes divided by it.
    ``context_parallel_balance`` says how a sequence is cut into the processes' shards:
    "zigzag" (chunks ``r`` and ``2N - 1 - r``: equal causal work for one document), or
    "documents" (ring and allgather: chunks handed out by their work under the packed
    documents' masks, so that short documents do not leave ranks idle).
    """

    context_parallel_size: int = 1
    context_parallel_impl: Literal["ring", "allgather", "ulysses"] = "ring"
    context_parallel_balance: Literal["zigzag", "documents"] = "zigzag"

    def __post_init__(self):
        _check(self.context_parallel_size >= 1, "parallel.context_parallel_size", self.context_parallel_size,
               "must be >= 1")
        _check(self.context_parallel_balance == "zigzag" or self.context_parallel_impl != "ulysses",
               "parallel.context_parallel_balance", self.context_parallel_balance,
               "must be 'zigzag' with context_parallel_impl='ulysses' (it balances by heads); 'documents' "
               "needs ring or allgather")


TRACKERS = ("wandb", "tensorboard")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go. ``metrics.jsonl`` in the output directory is always written; the
    ``trackers`` listed here are added through Accelerate."""

    trackers: list[str] = field(default_factory=list)
    log_every: int = 1
    project: str = "flashlm"
    run_name: str | None = None  # None: the output directory's name
    wandb_mode: Literal["offline", "online"] = "offline"
    progress_bar: bool = True
    peak_tflops: float | None = None  # per-device peak for MFU; None: known GPUs, else no MFU

    def __post_init__(self):
        for name in self.trackers:
            if name not in TRACKERS:
                raise RecipeError(f"logging.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        _check(self.log_every >= 1, "logging.log_every", self.log_every, "must be >= 1")


@dataclass(kw_only=True)
class ExportConfig:
    """Hugging Face export of the final model (with its tokenizer) after training."""

    enabled: bool = False
    dir: str | None = None  # None: <output_dir>/hf


@dataclass(kw_only=True)
class Recipe:
    """Everything one training run needs. ``init_from`` names a Hugging Face Llama directory,
    a flashlm checkpoint, or a flashlm run directory (its latest checkpoint) to start from.
    ``resume`` is false, true (the latest complete checkpoint in ``output_dir``) or the path of
    a checkpoint."""

    output_dir: str
    model: ModelRecipe
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    training: TrainingConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    init_from: str | None = None
    resume: bool | str = False

    def __post_init__(self):
        if self.model.preset is None and self.init_from is None:
            raise RecipeError("model.preset is required unless init_from names a model to start from")
        if self.model.preset is not None and self.init_from is not None:
            raise RecipeError(
                f"model.preset={self.model.preset!r} and init_from={self.init_from!r} both choose the "
                "architecture; drop model.preset when fine-tuning"
            )
        _check(
            self.data.kind != "sft" or self.training.document_mask, "training.document_mask",
            self.training.document_mask, "must be true for data.kind: sft (packed examples must not see each other)",
        )
        cp = self.parallel.context_parallel_size
        _check(
            cp == 1 or self.training.seq_len % (2 * cp) == 0, "training.seq_len", self.training.seq_len,
            f"must be a multiple of 2 * parallel.context_parallel_size = {2 * cp} (each rank holds two chunks)",
        )
        _check(
            cp == 1 or not self.training.document_mask or self.training.micro_batch_size == 1,
            "training.micro_batch_size", self.training.micro_batch_size,
            "must be 1 with document_mask under context parallelism (one packed sequence per step)",
        )
        _check(
            self.schedule.warmup_steps <= self.training.steps, "schedule.warmup_steps",
            self.schedule.warmup_steps, f"must not exceed training.steps={self.training.steps}",
        )

    @property
    def export_dir(self) -> Path:
        return Path(self.export.dir) if self.export.dir else Path(self.output_dir) / "hf"

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-ready data; ``recipe_from_dict`` inverts it."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ModelRecipe):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out


# Fields that steer a run without changing its trajectory: a resumed run may change them.
RUN_CONTROL_KEYS = (
    "output_dir", "resume", "logging", "export", "data.cache_dir", "data.num_proc", "training.steps",
    "training.stop_at_step", "training.eval_every", "training.eval_batches", "training.ckpt_every",
    "training.keep_last", "training.on_nonfinite", "training.max_skipped_steps",
    # Sub-batches of a micro-batch: the same step to fp32 rounding, like the layout below.
    "training.micro_batch_split",
    # How processes split the work (like their number, which a recipe does not hold): the same
    # run continues on another layout, to fp32 rounding.
    "parallel",
)


def trajectory_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes (``Recipe.to_dict``),
    leaving out ``RUN_CONTROL_KEYS``: a non-empty answer means the two are different runs.
    Each is resolved again first, so a field that a recipe saved by an older flashlm lacks
    counts as its default (a field added since, left at its default, changes nothing)."""
    flat_a, flat_b = _flatten(_with_defaults(a)), _flatten(_with_defaults(b))
    keys = sorted(set(flat_a) | set(flat_b))
    return [
        k for k in keys
        if flat_a.get(k) != flat_b.get(k)
        and not any(k == c or k.startswith(c + ".") for c in RUN_CONTROL_KEYS)
    ]


def _with_defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with every field of this version's ``Recipe``; as it is when it no longer
    validates (a field since removed or renamed: then it differs where it differs)."""
    try:
        return recipe_from_dict(copy.deepcopy(recipe)).to_dict()
    except (ConfigError, TypeError):
        return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``--key=value`` overrides, and validate it into a ``Recipe``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    apply_overrides(raw, overrides)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Validate nested plain data (YAML, or ``Recipe.to_dict()``) into a ``Recipe``."""
    return _build(Recipe, raw, "")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """Set ``--section.key=value`` / ``--key=value`` / ``--flag`` overrides into ``raw`` in place.

    Values stay strings here; they are coerced to the field's type when the recipe is built.
    A bare ``--key`` is resolved to the one section that has a field of that name.
    """
    for item in overrides:
        if not item.startswith("--"):
            raise RecipeError(f"override {item!r} must look like --key=value or --section.key=value")
        key, sep, value = item[2:].partition("=")
        if not sep:
            value = "true"
        parts = _resolve_key(key.replace("-", "_")).split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value


def valid_keys() -> dict[str, list[str]]:
    """Section name -> its field names ('' for the top level)."""
    out = {"": [f.name for f in dataclasses.fields(Recipe)]}
    for name, cls in _section_classes().items():
        out[name] = _model_keys() if cls is ModelRecipe else [f.name for f in dataclasses.fields(cls)]
    return out


def _resolve_key(key: str) -> str:
    sections = valid_keys()
    if "." in key:
        section, _, name = key.partition(".")
        if section not in sections or section == "":
            raise _unknown(section, [s for s in sections if s], "section")
        if name not in sections[section]:
            raise _unknown(key, sections[section], f"key in section {section!r}")
        return key
    if key in sections[""]:
        return key
    owners = [s for s, names in sections.items() if s and key in names]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if len(owners) > 1:
        raise RecipeError(f"override --{key} is ambiguous; write one of " + ", ".join(f"--{s}.{key}" for s in owners))
    every = [f"{s}.{n}" if s else n for s, names in sections.items() for n in names]
    raise _unknown(key, every, "key")


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(hints[f.name])}


def _model_keys() -> list[str]:
    return ["preset"] + [f.name for f in dataclasses.fields(GPTConfig) if f.init]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``, coercing each value to its field type."""
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping, got {raw!r}")
    if cls is ModelRecipe:
        return _build_model(raw, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise _unknown(prefix + str(key), list(fields), f"key in {where}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required key {prefix + name!r}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from e


def _build_model(raw: dict[str, Any], prefix: str) -> ModelRecipe:
    raw = dict(raw)
    preset = raw.pop("preset", None)
    fields = {f.name for f in dataclasses.fields(GPTConfig) if f.init}
    hints = typing.get_type_hints(GPTConfig)
    overrides = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(prefix + str(key), ["preset", *fields], "key in model")
        overrides[key] = _coerce(value, hints[key], prefix + key)
    return ModelRecipe(preset=None if preset is None else _coerce(preset, str, prefix + "preset"), overrides=overrides)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (YAML data or a command-line string) to type ``tp`` or raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except RecipeError:
                pass
        raise RecipeError(invalid(key, value, f"expected a {_type_name(tp)}"))
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise RecipeError(invalid(key, value, f"expected one of {', '.join(repr(a) for a in args)}"))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(invalid(key, value, "expected a list"))
        item = args[0] if args else Any
        items = [_coerce(v.strip() if isinstance(v, str) else v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise RecipeError(invalid(key, value, "expected a mapping"))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise RecipeError(invalid(key, value, "expected a bool (true/false)"))
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                value = _float_or(value, value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(invalid(key, value, "expected an int"))
    if tp is float:
        if isinstance(value, str):
            value = _float_or(value, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(invalid(key, value, "expected a float"))
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(invalid(key, value, "expected a string"))
    if isinstance(value, tp):
        return value
    raise RecipeError(invalid(key, value, f"expected a {_type_name(tp)}"))


def _float_or(text: str, fallback: Any) -> Any:
    try:
        return float(text)
    except ValueError:
        return fallback


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown(key: str, valid: list[str], what: str) -> RecipeError:
    close = difflib.get_close_matches(key.rpartition(".")[2], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(f"unknown {what}: {key!r}{hint}; valid keys: {', '.join(valid)}")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise RecipeError(invalid(key, value, why))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out
