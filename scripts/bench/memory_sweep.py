"""Memory sweep: peak memory and tokens/s of real training steps from 4K to 512K context,
flashlm against a Hugging Face Llama of the same shape, all rows in one run.

Every measurement is a few real training steps of the preset model (random weights, random
token ids): forward under bf16 autocast over fp32 weights, backward, fused AdamW step. Steps
hold the same number of tokens at every context (``--tokens-per-step``; the batch shrinks as
the context grows, down to one row). Peak memory is ``torch.cuda.max_memory_allocated`` over
the steps (weights, gradients and AdamW state included); tokens/s is timed over the steps
after the warm-up one(s). Rows:

    flashlm          flash attention + every memory lever (chunked loss, checkpointing with
                     bf16 inputs offloaded to pinned CPU memory, chunked MLP). Every flashlm
                     row runs RMSNorm, RoPE and SwiGLU as Triton kernels (fused_ops="auto" on
                     CUDA), the counterpart of liger's kernels in hf_liger
    flashlm_keepattn the same, plus checkpoint_keep_attention: each layer's attention output
                     is kept from the forward pass, so the recomputation skips attention's
                     forward (one more (tokens, hidden) bf16 tensor per layer)
    flashlm_sdpa     the same levers, torch SDPA attention (cuDNN on an H100)
    flashlm_eager    the same levers, materialized-softmax attention
    hf               transformers LlamaForCausalLM, SDPA + gradient checkpointing
    hf_liger         the same with liger-kernel (apply_liger_kernel_to_llama: fused linear
                     cross-entropy, RMSNorm, RoPE, SwiGLU)
    hf_liger_nockpt  HF + liger-kernel without gradient checkpointing (faster where it fits)
  lever ladder (opt in with --rows):
    flashlm_plain    flash attention, no levers (full logits, no checkpointing)
    flashlm_ckpt     + chunked loss + checkpointing (fp32 inputs)
    flashlm_bf16     + bf16 checkpointed inputs
    flashlm_mlp      + chunked MLP (everything but the offload)
    flashlm_liger    every lever, with liger-kernel's fused loss instead of flashlm's
    flashlm_torch_ops  every lever, RMSNorm, RoPE and SwiGLU as PyTorch ops (fused_ops="torch")
    flashlm_nondet   flashlm_keepattn with attention_deterministic=False (the fused attention
                     backward on Hopper; dQ summed in a varying order)
    flashlm_auto     every lever but the per-layer choices, gradient_checkpointing="auto": the
                     planner picks, for each context, the plan with the least recomputation
                     whose estimated peak fits --budget (GiB, or a fraction of the GPU, or the
                     name of a Hugging Face row: that row's measured peak at the same context),
                     and the row records the plan and its predicted peak beside the measured one
    flashlm_auto_split  flashlm_auto whose plan may also run the step's batch as sub-batches
                     (``plan_split``, shown as "4 x (plan)"), as training.micro_batch_split: auto does
  --compile compiles the decoder blocks of every flashlm row (flashlm.model.compile).

On a GPU with a known bf16 peak each measurement also gets its MFU (`GPT.flops_per_token` of
the preset, the same for every row, recomputation not counted). ``--profile-steps N`` profiles
N more steps after the timed ones (torch.profiler) and tabulates where a step's time goes: the
kernels' time by category (attention, matmul, loss, norm, rope, activation, optimizer, compiled,
copy, elementwise), next to the step time and the time the device was busy at all, whose
difference is the device waiting on the host.

An out-of-memory is recorded and ends that row (longer contexts are skipped), as does the row
time cap; ``--time-budget`` skips whatever would not finish in time, so a run always ends with
a complete file. The order puts what a tight budget should keep first: the two flashlm rows
above and HF + liger up to 128K, then flashlm at 256K, then the other rows, then the longest
contexts. Results are written after every measurement: ``memory_sweep.json`` (the provenance
block of ``scripts/provenance.py``, settings, every measurement), ``memory_sweep.md`` (tables
with ratios to hf_liger) and, at the end of each row, ``memory_sweep.png`` (memory and tokens/s
against context).

    PYTHONPATH=. python3 scripts/bench/memory_sweep.py --preset 1b 100m --out results/memory
    PYTHONPATH=. python3 scripts/bench/memory_sweep.py --preset 100m --quick
    PYTHONPATH=. python3 scripts/bench/memory_sweep.py --merge a/memory_sweep.json b/memory_sweep.json --out c
    PYTHONPATH=. python3 scripts/bench/memory_sweep.py --device cpu --preset debug --contexts 128 256 \
        --tokens-per-step 256   # dry run of the logic on CPU (peak = live tensor bytes)

Needs neither datasets nor wandb; matplotlib only for the plot.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import add_commit_argument, describe, environment, write_report  # noqa: E402

from flashlm import GPT, GPTConfig
from flashlm.model.compile import compile_blocks
from flashlm.model.plan import plan_for_training
from flashlm.profiling import KERNEL_CATEGORIES, LiveTensorBytes, peak_bf16_flops, time_breakdown

K = 1024
DEFAULT_CONTEXTS = [4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K, 256 * K, 512 * K]
# Every row runs up to here; past it, by default only the flashlm row.
BASE_MAX_CONTEXT = 128 * K
LEVERS = dict(loss_chunk_size=2048, gradient_checkpointing=True, checkpoint_dtype="bfloat16",
              checkpoint_offload=True, mlp_chunk_size=16384, fused_ops="auto")
# The planned rows: the planner decides per layer what the offload and checkpointing levers fix.
AUTO_LEVERS = dict(attn_backend="flash", **{**LEVERS, "checkpoint_offload": False, "gradient_checkpointing": "auto"})
ROWS = {
    "flashlm": ("flashlm, all levers", dict(attn_backend="flash", **LEVERS)),
    "flashlm_keepattn": ("flashlm, all levers, attention outputs kept for the recomputation",
                         dict(attn_backend="flash", **LEVERS, checkpoint_keep_attention=True)),
    "flashlm_sdpa": ("flashlm, all levers, SDPA attention", dict(attn_backend="sdpa", **LEVERS)),
    "flashlm_eager": ("flashlm, all levers, eager attention", dict(attn_backend="eager", **LEVERS)),
    "hf": ("HF Llama, SDPA + gradient checkpointing", None),
    "hf_liger": ("HF Llama + liger-kernel, SDPA + gradient checkpointing", None),
    "hf_liger_nockpt": ("HF Llama + liger-kernel, SDPA, no gradient checkpointing", None),
    "flashlm_plain": ("flashlm, no levers", dict(attn_backend="flash")),
    "flashlm_ckpt": ("flashlm, chunked loss + checkpointing",
                     dict(attn_backend="flash", loss_chunk_size=2048, gradient_checkpointing=True)),
    "flashlm_bf16": ("flashlm, + bf16 checkpoints",
                     dict(attn_backend="flash", loss_chunk_size=2048, gradient_checkpointing=True,
                          checkpoint_dtype="bfloat16")),
    "flashlm_mlp": ("flashlm, + chunked MLP (no offload)",
                    dict(attn_backend="flash", **{**LEVERS, "checkpoint_offload": False})),
    "flashlm_liger": ("flashlm, all levers, liger loss", dict(attn_backend="flash", **LEVERS, loss_impl="liger")),
    "flashlm_torch_ops": ("flashlm, all levers, PyTorch RMSNorm/RoPE/SwiGLU",
                          dict(attn_backend="flash", **{**LEVERS, "fused_ops": "torch"})),
    "flashlm_nondet": ("flashlm, all levers, attention outputs kept, non-deterministic attention backward",
                       dict(attn_backend="flash", **LEVERS, checkpoint_keep_attention=True,
                            attention_deterministic=False)),
    "flashlm_auto": ("flashlm, levers, per-layer checkpointing planned within --budget", AUTO_LEVERS),
    "flashlm_auto_split": ("flashlm, levers, per-layer checkpointing and micro-batch split planned within --budget",
                           AUTO_LEVERS),
}
# Rows whose plan may run the step's batch as sub-batches (training.micro_batch_split: auto).
SPLIT_ROWS = {"flashlm_auto_split"}
DEFAULT_ROWS = ["flashlm", "flashlm_keepattn", "flashlm_sdpa", "flashlm_eager", "hf", "hf_liger"]
# Run order within a preset: the headline rows first, so a tight budget cuts the others.
ORDER = ["flashlm", "hf", "hf_liger", "hf_liger_nockpt", "flashlm_keepattn", "flashlm_sdpa", "flashlm_eager",
         "flashlm_plain", "flashlm_ckpt", "flashlm_bf16", "flashlm_mlp", "flashlm_liger", "flashlm_torch_ops",
         "flashlm_nondet", "flashlm_auto", "flashlm_auto_split"]
REFERENCE_ROW = "hf_liger"
FIRST_GUESS = 15.0


class SimulatedOutOfMemory(LiveTensorBytes):
    """On CPU: live tensor bytes, raising torch.OutOfMemoryError past ``limit`` (dry runs)."""

    def __init__(self, baseline, limit):
        super().__init__()
        self.baseline, self.limit = baseline, limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.limit is not None and self.baseline + self.current > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {self.baseline + self.current} B live, limit {self.limit} B")
        return out


def is_oom(error):
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "cublas_status_alloc_failed" in text)


def model_config(preset, row, max_context, budget=0.9):
    """The GPTConfig of a flashlm row (None for the Hugging Face rows); ``budget`` is the
    checkpoint_memory_budget of the rows that plan their checkpointing."""
    overrides = ROWS[row][1]
    if overrides is None:
        return None
    if overrides.get("gradient_checkpointing") == "auto":
        overrides = dict(overrides, checkpoint_memory_budget=budget)
    return GPTConfig.from_preset(preset, max_position_embeddings=max_context, **overrides)


@contextlib.contextmanager
def liger_patched():
    """apply_liger_kernel_to_llama() for the models built inside, undone on exit (liger patches
    transformers' Llama module, which the plain HF row must not see)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    module_state = dict(vars(modeling_llama))
    classes = {cls: {k: v for k, v in vars(cls).items() if not k.startswith("__")}
               for cls in module_state.values() if isinstance(cls, type) and cls.__module__ == modeling_llama.__name__}
    apply_liger_kernel_to_llama()
    try:
        yield
    finally:
        for name in [n for n in vars(modeling_llama) if n not in module_state]:
            delattr(modeling_llama, name)
        for name, value in module_state.items():
            if vars(modeling_llama).get(name) is not value:
                setattr(modeling_llama, name, value)
        for cls, attrs in classes.items():
            for name in [n for n in vars(cls) if not n.startswith("__") and n not in attrs]:
                delattr(cls, name)
            for name, value in attrs.items():
                if vars(cls).get(name) is not value:
                    setattr(cls, name, value)


def numeric_budget(budget):
    """``--budget`` as a GPTConfig.checkpoint_memory_budget: a number as given; a reference
    row's name becomes 0.9 of the device, which each context then replaces with the row's
    measured peak (`reference_budget_bytes`)."""
    return budget if isinstance(budget, float) else 0.9


def reference_budget_bytes(budget, peaks, preset, context):
    """The memory an auto plan must fit at ``context`` when ``--budget`` names a row: that row's
    measured peak there, in bytes; None when --budget is a number or the row has no peak there
    (out of memory, skipped), which leaves the config's budget."""
    if isinstance(budget, float) or (preset, budget, context) not in peaks:
        return None
    return int(peaks[(preset, budget, context)] * 2**30)


def build(preset, row, max_context, device, budget=0.9, compiled=False):
    """(model, loss function of (model, input_ids), patches) for a row; raises ImportError when
    a row's library is missing and ValueError when it cannot run on ``device``. ``patches`` is an
    ExitStack holding whatever the row patched (liger-kernel's changes to transformers' Llama,
    whose loss patch lives on the class and so must stay for the row's steps); close it after
    the row. ``compiled``: compile a flashlm model's decoder blocks."""
    patches = contextlib.ExitStack()
    config = model_config(preset, row, max_context, numeric_budget(budget))
    if config is not None:
        if device.type != "cuda" and (config.attn_backend == "flash" or config.loss_impl == "liger"):
            raise ValueError("needs CUDA (Triton kernels)")
        with torch.device(device):
            model = GPT(config)
        if compiled:
            compile_blocks(model)
        return model, lambda m, ids: m(ids, labels=ids).loss, patches
    from transformers import LlamaConfig, LlamaForCausalLM

    from flashlm.hf import to_hf_config

    values = to_hf_config(GPTConfig.from_preset(preset, max_position_embeddings=max_context))
    hf_config = LlamaConfig.from_dict({**values, "use_cache": False}, attn_implementation="sdpa")
    if row in ("hf_liger", "hf_liger_nockpt"):
        if device.type != "cuda":
            raise ValueError("needs CUDA (Triton kernels)")
        patches.enter_context(liger_patched())
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    if row != "hf_liger_nockpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, lambda m, ids: m(input_ids=ids, labels=ids, use_cache=False).loss, patches


def tensor_bytes(model, optimizer):
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


class Meter:
    """Peak memory over a block: the CUDA allocator's peak, or on CPU the live tensor bytes
    plus what the model and optimizer already hold."""

    def __init__(self, device, model, optimizer, limit):
        self.device, self.model, self.optimizer, self.limit = device, model, optimizer, limit
        self.peak = None

    @contextlib.contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated(self.device))
            return
        baseline = tensor_bytes(self.model, self.optimizer)
        with SimulatedOutOfMemory(baseline, self.limit) as live:
            try:
                yield
            finally:
                self.peak = max(self.peak or 0, baseline + live.peak)


def measure(model, loss_fn, optimizer, context, args, device, deadline, budget_bytes=None, split=False):
    """Warm-up and timed training steps at one context; returns the measurement's fields.
    ``budget_bytes``: the memory an auto plan must fit (default: the config's budget);
    ``split``: the plan may run the batch as sub-batches, as the trainer does."""
    batch = max(1, args.tokens_per_step // context)
    tokens = batch * context
    gen = torch.Generator(device=device).manual_seed(context)
    vocab = model.config.vocab_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    limit = args.cpu_memory_limit_mb * 2**20 if args.cpu_memory_limit_mb else None
    meter = Meter(device, model, optimizer, limit)

    parts = 1

    def step():
        ids = torch.randint(0, vocab, (batch, context), device=device, generator=gen)
        total = 0.0
        with meter.measure():
            for rows in ids.chunk(parts):
                with autocast:
                    loss = loss_fn(model, rows) / parts
                loss.backward()
                total += loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return total.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = {"batch": batch, "tokens_per_step": tokens}
    if isinstance(model, GPT) and model.config.gradient_checkpointing == "auto":
        planned = plan_for_training(model, seq_len=context, micro_batch_size=batch, device=device,
                                    budget_bytes=budget_bytes, split=split)
        print(planned.describe(), flush=True)
        parts = planned.split
        result.update(plan=planned.spec if parts == 1 else f"{parts} x ({planned.spec})",
                      predicted_peak_gib=planned.peak_bytes / 2**30, budget_gib=planned.budget_bytes / 2**30)
    sync()
    start = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]
    sync()
    warmup_s = time.perf_counter() - start
    per_step = warmup_s / max(args.warmup, 1)
    timed = args.steps if per_step <= args.slow_step else 1
    if time.perf_counter() + timed * per_step > deadline:
        timed = 0
        result["note"] = "not timed (time budget)"
    start = time.perf_counter()
    losses += [step() for _ in range(timed)]
    sync()
    elapsed = time.perf_counter() - start
    result.update(warmup_s=warmup_s, timed_steps=timed, loss_first=losses[0], loss_last=losses[-1],
                  peak_gib=meter.peak / 2**30)
    if timed:
        result.update(step_s=elapsed / timed, tokens_per_s=tokens * timed / elapsed)
        if args.profile_steps and time.perf_counter() + args.profile_steps * 2 * per_step < deadline:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as profile:
                for _ in range(args.profile_steps):
                    step()
                sync()
            result["profile"] = time_breakdown(profile, args.profile_steps)
    if device.type == "cuda":
        result["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if hasattr(torch.cuda, "host_memory_stats"):  # pinned host memory held, offload buffers included
            result["host_pinned_gib"] = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**30
    return result


def flops_per_token(preset, context):
    """Model FLOPs per training token of ``preset`` at ``context`` (`GPT.flops_per_token`): the same
    for every row, as the Hugging Face rows have the preset's shape. No recomputation counted."""
    with torch.device("meta"):
        return GPT(GPTConfig.from_preset(preset, max_position_embeddings=context)).flops_per_token(context)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        # Cached pinned blocks (offloaded activations) go back too; the name differs by version.
        for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):
            if hasattr(torch._C, name):
                getattr(torch._C, name)()
                break


def tier(row, context):
    """Run order, so that a tight --time-budget cuts the least important measurements: 1. flashlm
    (with and without kept attention outputs) and HF + liger up to 128K (the comparison), 2. flashlm at 256K, 3. the other rows up to 128K,
    4. everything longer."""
    if context <= BASE_MAX_CONTEXT:
        return 1 if row in ("flashlm", "flashlm_keepattn", REFERENCE_ROW) else 3
    return 2 if row == "flashlm" and context <= 2 * BASE_MAX_CONTEXT else 4


def plan(args):
    """Segments (preset, row, contexts) in run order: by tier, then preset (as given), then row."""
    rows = sorted(args.rows, key=ORDER.index)
    caps = {row: (max(args.contexts) if row == "flashlm" else BASE_MAX_CONTEXT) for row in rows}
    for item in args.max_context:
        row, _, value = item.rpartition("=")
        for name in ([row] if row else rows):
            caps[name] = int(value)
    segments = {}
    for p, preset in enumerate(args.preset):
        for row in rows:
            for context in (c for c in args.contexts if c <= caps[row]):
                key = (tier(row, context), p, ORDER.index(row))
                segments.setdefault(key, (preset, row, []))[2].append(context)
    return [segments[key] for key in sorted(segments)]


def predicted_seconds(last, context, previous_context, tokens_per_step):
    """A guess at the next context's cost from the last one's: attention grows with the
    context, and past one row per step so do the tokens per step. A row's first context is
    guessed at FIRST_GUESS seconds (building the model, compiling)."""
    if last is None:
        return FIRST_GUESS
    growth = context / previous_context
    return last * (growth * 1.5 if context > tokens_per_step else 1.5)


def run(args, record):
    device = torch.device(args.device)
    start = time.perf_counter()
    deadline = start + args.time_budget if args.time_budget else float("inf")
    stopped = {}  # (preset, row) -> why its longer contexts are skipped
    row_seconds = {}  # (preset, row) -> seconds spent measuring it
    history = {}  # (preset, row) -> (seconds, context) of its last measurement
    peaks = {}  # (preset, row, context) -> measured peak GiB, for --budget ROW
    peak_flops = peak_bf16_flops(device)

    def out_of_time(key, context):
        """Why ``context`` is not started for ``key`` (None: it is)."""
        last, previous = history.get(key, (None, None))
        guess = predicted_seconds(last, context, previous, args.tokens_per_step)
        if time.perf_counter() + guess > deadline:
            return "time budget"
        if row_seconds.get(key, 0.0) + guess > args.row_time_cap:
            return f"row time cap ({args.row_time_cap:.0f}s)"
        return None

    for preset, row, contexts in plan(args):
        key = (preset, row)
        if key not in stopped and (reason := out_of_time(key, contexts[0])):
            stopped[key] = reason  # decided before building the model
        if key in stopped:
            for context in contexts:
                record(preset, row, context, status="skipped", reason=stopped[key])
            continue
        segment_start = time.perf_counter()
        try:
            model, loss_fn, patches = build(preset, row, max(contexts), device, args.budget, args.compile)
        except (ImportError, ValueError) as e:
            stopped[key] = str(e).splitlines()[0][:120]
            for context in contexts:
                record(preset, row, context, status="unavailable", reason=stopped[key])
            continue
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        print(f"[{time.perf_counter() - start:6.0f}s] {preset} {row}: built in "
              f"{time.perf_counter() - segment_start:.1f}s", flush=True)
        for context in contexts:
            if key not in stopped and (reason := out_of_time(key, context)):
                stopped[key] = reason
            if key in stopped:
                record(preset, row, context, status="skipped", reason=stopped[key])
                continue
            now = time.perf_counter()
            failure = None
            try:
                fields = measure(model, loss_fn, optimizer, context, args, device, deadline,
                                 reference_budget_bytes(args.budget, peaks, preset, context), split=row in SPLIT_ROWS)
                peaks[(preset, row, context)] = fields["peak_gib"]
                if fields.get("tokens_per_s") and peak_flops:
                    fields["mfu"] = flops_per_token(preset, context) * fields["tokens_per_s"] / peak_flops
            except Exception as e:  # noqa: BLE001 - one row's failure must not end the sweep
                status = "oom" if is_oom(e) else "error"
                failure = status, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
                if status == "error":
                    traceback.print_exc()
            spent = time.perf_counter() - now
            row_seconds[key] = row_seconds.get(key, 0.0) + spent
            if failure is not None:
                # The exception, and the frames that held the step's tensors, are gone here.
                optimizer.zero_grad(set_to_none=True)
                free(device)
                status, reason = failure
                stopped[key] = f"{'out of memory' if status == 'oom' else 'error'} at {tokens(context)}"
                record(preset, row, context, status=status, reason=reason, seconds=spent)
            else:
                record(preset, row, context, status="ok", seconds=spent, **fields)
            history[key] = (spent, context)
        patches.close()
        del model, optimizer, loss_fn
        free(device)
        args.on_segment_end()


def tokens(n):
    """4096 -> "4K"; counts that are not whole K stay numbers."""
    return f"{n // K}K" if n % K == 0 else str(n)


def gib(value):
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.1 else f"{value:.4f}"


def per_second(value):
    return f"{value / 1000:.1f}K" if value >= 1000 else f"{value:.0f}"


def _cell(r, field, fmt):
    if r is None:
        return "-"
    if r["status"] == "oom":
        return "OOM"
    if r["status"] != "ok":
        return r["status"]
    value = r.get(field)
    return "-" if value is None else fmt(value)


def markdown(data):
    env, results = data["environment"], data["results"]
    lines = [f"Training-step memory and throughput, {describe(env, 'transformers', 'liger_kernel')}.", "",
             "Random weights and token ids; forward under bf16 autocast over fp32 weights, backward, fused "
             "AdamW. Same tokens per step at every context (batch = tokens per step / context, at least 1). "
             "Peak: `torch.cuda.max_memory_allocated` over the steps, weights, gradients and AdamW state "
             "included. Ratios are to HF + liger (memory: lower is better; tokens/s: higher is better).", "",
             "Rows: " + "; ".join(f"`{r}`: {ROWS[r][0]}" for r in ORDER
                                  if any(x["row"] == r for x in results)) + ".", ""]
    for preset in dict.fromkeys(r["preset"] for r in results):
        mine = [r for r in results if r["preset"] == preset]
        rows = [r for r in ORDER if any(x["row"] == r for x in mine)]
        contexts = sorted({r["context"] for r in mine})
        by = {(r["row"], r["context"]): r for r in mine}
        steps = sorted({r["tokens_per_step"] for r in mine if "tokens_per_step" in r})
        lines.append(f"### {preset} (tokens per step: {', '.join(map(tokens, steps)) or '-'})")
        for title, field, fmt in (("peak memory, GiB", "peak_gib", gib), ("tokens/s", "tokens_per_s", per_second)):
            ratio_rows = [r for r in rows if r.startswith("flashlm")] if REFERENCE_ROW in rows else []
            header = ["context", *rows, *(f"{r} / {REFERENCE_ROW}" for r in ratio_rows)]
            lines += ["", f"{title}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for c in contexts:
                cells = [tokens(c)] + [_cell(by.get((r, c)), field, fmt) for r in rows]
                ref = by.get((REFERENCE_ROW, c))
                for r in ratio_rows:
                    a = by.get((r, c))
                    if a and ref and a.get(field) and ref.get(field) and a["status"] == ref["status"] == "ok":
                        cells.append(f"{a[field] / ref[field]:.2f}x")
                    else:
                        cells.append("-")
                lines.append("| " + " | ".join(cells) + " |")
        if any(r.get("mfu") for r in mine):
            header = ["context", *rows]
            lines += ["", "MFU (model FLOPs, no recomputation counted, over the GPU's dense bf16 peak):", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for c in contexts:
                lines.append("| " + " | ".join([tokens(c)] + [_cell(by.get((r, c)), "mfu", lambda x: f"{x:.0%}")
                                                              for r in rows]) + " |")
        lines += profile_table([r for r in mine if r.get("profile")])
        notes = {}
        for r in mine:
            if r["status"] in ("oom", "error"):
                notes[r["row"], r["context"]] = f"{r['row']} at {tokens(r['context'])}: {r['reason']}"
            elif r["status"] in ("unavailable", "skipped") and (r["row"], r["status"]) not in notes:
                where = "" if r["status"] == "unavailable" else f" from {tokens(r['context'])}"
                notes[r["row"], r["status"]] = f"{r['row']} {r['status']}{where}: {r['reason']}"
        notes = list(notes.values())
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines.append("")
    return "\n".join(lines)


def profile_table(profiled):
    """Markdown lines: where each profiled measurement's step time goes, by kernel category."""
    if not profiled:
        return []
    order = [c for c, _ in KERNEL_CATEGORIES] + ["other"]
    seen = [c for c in order if any(c in r["profile"]["category_ms"] for r in profiled)]
    header = ["row", "context", "step", "device busy", *seen]
    lines = ["", f"where the time goes, ms per step ({profiled[0]['profile']['source']}, "
             "profiled steps after the timed ones; busy: the union of the kernels' intervals):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in profiled:
        prof = r["profile"]
        cells = [r["row"], tokens(r["context"]), f"{r['step_s'] * 1e3:.0f}", f"{prof['busy_ms']:.0f}"]
        cells += [f"{prof['category_ms'][c]:.1f}" if c in prof["category_ms"] else "-" for c in seen]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(data, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    presets = list(dict.fromkeys(r["preset"] for r in results))
    fig, axes = plt.subplots(2, len(presets), figsize=(6.5 * len(presets), 8), squeeze=False)
    gpu_gib = data["environment"].get("gpu_memory_gib")
    for col, preset in enumerate(presets):
        mine = [r for r in results if r["preset"] == preset]
        for ax, field, label in ((axes[0][col], "peak_gib", "peak memory (GiB)"),
                                 (axes[1][col], "tokens_per_s", "tokens/s")):
            for row in [r for r in ORDER if any(x["row"] == r for x in mine)]:
                points = sorted((r["context"], r[field]) for r in mine
                                if r["row"] == row and r["status"] == "ok" and r.get(field) is not None)
                ooms = [r["context"] for r in mine if r["row"] == row and r["status"] == "oom"]
                if not points and not ooms:
                    continue
                style = "-" if row.startswith("flashlm") else "--"
                line, = ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=row)
                for c in ooms:
                    y = points[-1][1] if points else 0
                    ax.plot([c], [y], "x", color=line.get_color(), markersize=10)
                    ax.annotate("OOM", (c, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=line.get_color())
            if field == "peak_gib" and gpu_gib:
                ax.axhline(gpu_gib, color="gray", linewidth=0.8, linestyle=":")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{preset}: {label}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{data['environment']['gpu']}, {data['environment']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(data, out, with_plot):
    write_report(out, "memory_sweep", data, markdown(data))
    if with_plot:
        plot(data, out / "memory_sweep.png")


def main(args):
    out = Path(args.out)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        data = {"environment": parts[0]["environment"], "settings": [p["settings"] for p in parts],
                "results": [r for p in parts for r in p["results"]]}
        write(data, out, with_plot=True)
        print(markdown(data))
        return data
    if not plan(args):
        sys.exit(f"scripts/bench/memory_sweep.py: nothing to run: every context in {args.contexts} is above its row's cap "
                 f"(rows other than flashlm stop at {BASE_MAX_CONTEXT // K}K unless --max-context ROW=N raises it)")
    data = {"environment": environment(args.device, commit=args.commit),
            "settings": {k: v for k, v in vars(args).items() if k not in ("merge", "on_segment_end")},
            "results": []}
    data["settings"]["levers"] = LEVERS

    def record(preset, row, context, **fields):
        entry = {"preset": preset, "row": row, "context": context, **fields}
        data["results"].append(entry)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()}
        print(json.dumps(shown), flush=True)
        write(data, out, with_plot=False)

    args.on_segment_end = lambda: write(data, out, with_plot=True)
    run(args, record)
    write(data, out, with_plot=True)
    print(markdown(data))
    return data


def budget_arg(text):
    """``--budget``: a positive number, or the name of a Hugging Face row."""
    if text in ROWS and ROWS[text][1] is None:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        hf_rows = ", ".join(r for r in ROWS if ROWS[r][1] is None)
        raise argparse.ArgumentTypeError(f"{text!r}: expected GiB above 1, a fraction in (0, 1], or one of {hf_rows}")
    return value


def non_negative_int(text):
    """``--profile-steps``: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of steps, 0 or more")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["100m"], help="model presets, run in this order")
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    p.add_argument("--contexts", nargs="+", type=int, default=DEFAULT_CONTEXTS)
    p.add_argument("--max-context", nargs="+", default=[], metavar="[ROW=]N",
                   help="longest context for a row (ROW=N) or for all rows (N), applied in order; "
                        "default 512K for flashlm, "
                        "128K for the others")
    p.add_argument("--quick", action="store_true", help="contexts 4K and 16K only, one timed step")
    p.add_argument("--tokens-per-step", type=int, default=32 * K)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per context (compilation, autotuning)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per context")
    p.add_argument("--profile-steps", type=non_negative_int, default=0,
                   help="after the timed steps, profile this many more (torch.profiler) and report where "
                        "their time goes by kernel category (0: no profile)")
    p.add_argument("--slow-step", type=float, default=8.0,
                   help="time a single step when a warm-up step took longer than this many seconds")
    p.add_argument("--row-time-cap", type=float, default=300.0,
                   help="seconds a (preset, row) may use before its longer contexts are skipped")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole sweep: what would not finish in time is skipped")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the logic")
    p.add_argument("--cpu-memory-limit-mb", type=float, default=None,
                   help="CPU dry run: raise out-of-memory past this many MiB of live tensors")
    p.add_argument("--budget", type=budget_arg, default=0.9,
                   help="flashlm_auto: the memory its plan must fit, GiB above 1 or a fraction of the device, "
                        "or a Hugging Face row (e.g. hf_liger): its measured peak at each context")
    p.add_argument("--compile", action="store_true", help="compile the decoder blocks of the flashlm rows")
    p.add_argument("--out", default="results/memory")
    add_commit_argument(p)
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier runs' JSON files into one report")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.steps = [4 * K, 16 * K], 1
    args.contexts = sorted(set(args.contexts))
    return args


if __name__ == "__main__":
    main(parse_args())
