"""Train or fine-tune a flashlm model from a recipe, through Hugging Face Accelerate.

    flashlm train recipes/debug_cpu.yaml --training.steps=100
    python -m flashlm.training.train recipes/debug_cpu.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m flashlm.training.train recipes/100m_4k.yaml

``main(cfg)`` first checks everything that can be wrong with the inputs (recipe, model,
context length, output directory, tokenizer, data) and raises ``StartError`` before it
writes anything, so a failed start never touches an existing run. Then it trains:

    at step 0:   evaluate (the untrained baseline)
    every step:  ``grad_accum_steps`` micro-steps of forward/backward (each micro-batch in
                 ``training.micro_batch_split`` sub-batches, one after another) -> clip the global grad
                 norm -> AdamW step -> log loss, lr, tokens/s, MFU and peak memory ->
                 evaluate (every ``eval_every`` steps and at the end) -> checkpoint (every
                 ``ckpt_every`` steps and at the end)
    at the end:  export to a Hugging Face directory if the recipe asks.

Metrics always go to ``<output_dir>/metrics.jsonl`` (one JSON object per line, keyed by
``step``); ``logging.trackers`` adds wandb and/or tensorboard. A resumed run continues
exactly where its checkpoint left off: same data, same RNG, same losses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from flashlm import data as flashlm_data
from flashlm.hf.convert import save_pretrained
from flashlm.model import GPT, GPTConfig
from flashlm.model.compile import compile_blocks, compile_enabled
from flashlm.model.loss import IGNORE_INDEX
from flashlm.model.plan import plan_for_training
from flashlm.parallel import ContextParallel, apply_context_parallel
from flashlm.parallel.fsdp import (all_finite, apply_fsdp, data_parallel_mesh, fsdp2_enabled, is_sharded,
                                   memory_report, mixed_precision_policy, prepare_sharded, unsharded_copy)
from flashlm.profiling import peak_bf16_flops
from flashlm.recipe import Recipe, RecipeError, load_recipe, trajectory_diff, valid_keys
from flashlm.training.checkpoint import (
    RUN_TOKENIZER,
    TRAINER_STATE,
    CheckpointManager,
    CorruptCheckpointError,
    is_checkpoint,
    load_model,
    read_json,
    read_recipe,
    resolve_checkpoint,
    verify,
)
from flashlm.training.evaluate import batch_loss, evaluate
from flashlm.training.optim import build_optimizer, lr_at
from flashlm.training.sharded_checkpoint import is_sharded_checkpoint, load_sharded, save_sharded
from flashlm.training.rundir import RunLock, RunLockedError, check_output_dir, is_run_dir, lock_holder


logger = logging.getLogger(__name__)


class StartError(Exception):
    """The run cannot start: bad inputs, found before anything was written."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; the run stopped without
    writing a checkpoint or an export of the non-finite model."""


def peak_flops(device: torch.device, cfg: Recipe) -> float | None:
    """Per-device peak FLOP/s that MFU is measured against, or None when unknown (e.g. CPU)."""
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops * 1e12
    return peak_bf16_flops(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLog:
    """Appends one JSON object per line to ``path``. On resume, records past ``keep_through``
    (written by the interrupted run after its checkpoint) are dropped first."""

    def __init__(self, path: Path, keep_through: int):
        self.path = path
        kept = []
        if keep_through > 0 and path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line torn by a crash or a full disk: what it said is lost anyway
                    logger.warning("%s: dropping a line that is not JSON (torn by an interrupted write): %.60r",
                                   path, line)
                    continue
                if record.get("step", 0) <= keep_through:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class Run:
    """Everything ``setup`` checked and built: the training loop's inputs."""

    cfg: Recipe
    accelerator: Any
    model: Any
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    data: Any
    train_loader: Any
    checkpoints: CheckpointManager
    resume_from: Path | None
    unigram_entropy: float
    layout: "ParallelLayout"
    split: int = 1  # sub-batches per micro-batch (training.micro_batch_split, resolved)


def setup(cfg: Recipe) -> Run:
    """Check every input and build model, optimizer and data. Writes nothing to ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.training
    accelerator = Accelerator(
        cpu=t.cpu,
        mixed_precision=_mixed_precision(t),
        log_with=cfg.logging.trackers or None,
        project_dir=cfg.output_dir,
    )
    set_seed(t.seed)
    if t.deterministic and accelerator.device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace, read when its handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(t.deterministic)
    out = Path(cfg.output_dir)
    holder = lock_holder(out)
    if holder is not None:
        raise StartError(f"output_dir {out} is in use by another flashlm run (pid {holder}); wait for it to end "
                         "or choose another output_dir. Nothing was changed.")
    problem = check_output_dir(out)
    if problem is not None:
        raise StartError(problem)
    if cfg.export.enabled and cfg.export.dir:
        export_dir = Path(cfg.export.dir)
        if is_checkpoint(export_dir) or is_run_dir(export_dir):
            raise StartError(f"export.dir={cfg.export.dir!r} is a flashlm run or checkpoint directory; export into "
                             "a directory of its own. Nothing was changed.")
        if cfg.resume is False and export_dir.is_dir() and any(export_dir.iterdir()):
            raise StartError(f"export.dir={cfg.export.dir!r} is not empty; a new run exports into a new or empty "
                             "directory. Nothing was changed.")
    try:
        tokenizer = flashlm_data.load_tokenizer(cfg.data.tokenizer)
        model = build_model(cfg, tokenizer)
        rope_max = model.config.max_position_embeddings
        if t.seq_len > rope_max:
            raise StartError(
                f"training.seq_len={t.seq_len} is above the model's max_position_embeddings={rope_max}, the "
                "context its RoPE is configured for; lower training.seq_len or raise model.max_position_embeddings "
                "(with rope_scaling if the model was trained shorter)"
            )
        layout = parallel_layout(cfg, accelerator, model.config)
        checkpoints = CheckpointManager(out / "checkpoints", t.keep_last)
        resume_from = _find_resume(cfg, checkpoints)
        with accelerator.main_process_first():
            data = flashlm_data.prepare_data(cfg.data, tokenizer, seq_len=t.seq_len)
        accelerator.print(data.summary())
        train_loader = flashlm_data.build_train_loader(
            data, batch_size=t.micro_batch_size, rank=layout.dp_rank, world_size=layout.dp_size
        )
        unigram = flashlm_data.unigram_entropy(data)
    except (ValueError, OSError) as e:
        raise StartError(str(e)) from e
    if layout.cp is not None:
        apply_context_parallel(model, layout.cp.group, layout.cp.impl, layout.cp.balance)
    model.to(accelerator.device)  # before the optimizer, so fused AdamW sees device parameters
    sharded = fsdp2_enabled(accelerator)
    split = 1 if t.micro_batch_split == "auto" else t.micro_batch_split
    if model.config.gradient_checkpointing == "auto":  # which layers to recompute, for this device and batch
        local_len = t.seq_len // layout.cp.size if layout.cp is not None else t.seq_len
        plan = plan_for_training(model, seq_len=local_len, micro_batch_size=t.micro_batch_size // split,
                                 device=accelerator.device, mixed_precision=accelerator.mixed_precision,
                                 world_size=accelerator.num_processes, sharded=sharded,
                                 split=t.micro_batch_split == "auto" and not t.document_mask,
                                 grad_accum_steps=t.grad_accum_steps * split)
        split *= plan.split
        accelerator.print(plan.describe())
    if compile_enabled(model.config, accelerator.device):
        compile_blocks(model)
    if sharded:  # the optimizer is built on the sharded parameters
        apply_fsdp(model, data_parallel_mesh(accelerator), mixed_precision_policy(accelerator.mixed_precision))
    optimizer = build_optimizer(model, cfg, fused=accelerator.device.type == "cuda")
    if sharded:
        model, optimizer = prepare_sharded(accelerator, model, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    return Run(cfg, accelerator, model, optimizer, tokenizer, data, train_loader, checkpoints, resume_from, unigram,
               layout, split)


def sub_batches(batch: dict[str, Any], split: int):
    """A data batch's rows in ``split`` equal parts, each with the weight that makes the weighted
    sum of their mean losses the whole batch's mean: its share of the batch's targets (labels
    other than IGNORE_INDEX past each row's first position), or 1/split without labels. Only
    input_ids and labels are split: the parts are for a run without document_mask."""
    if split == 1:
        return [(batch, 1.0)]
    keys = [k for k in ("input_ids", "labels") if k in batch]
    parts = [dict(zip(keys, rows)) for rows in zip(*(batch[k].chunk(split) for k in keys))]
    if "labels" not in batch:
        return [(part, 1.0 / split) for part in parts]
    counts = [(part["labels"][:, 1:] != IGNORE_INDEX).sum() for part in parts]
    total = sum(counts).clamp(min=1)
    return [(part, count / total) for part, count in zip(parts, counts)]


@dataclass
class ParallelLayout:
    """This process's place: its data-parallel rank among ``dp_size`` (which batches it reads),
    and the context-parallel group it shares each sequence with (None without one)."""

    dp_rank: int
    dp_size: int
    cp: Any = None

    def __str__(self) -> str:
        if self.cp is None:
            return ""
        balance = "" if self.cp.balance == "zigzag" else f", {self.cp.balance} balance"
        return f" ({self.dp_size} data-parallel x {self.cp.size} context-parallel, {self.cp.impl}{balance})"


def parallel_layout(cfg: Recipe, accelerator, config) -> ParallelLayout:
    """The data-parallel x context-parallel layout of this launch, checked: the context-parallel
    size must divide the processes, attention must be flashlm's kernel, and ulysses needs heads
    that divide over the group. Raises ``StartError`` naming the problem."""
    size, impl, world = cfg.parallel.context_parallel_size, cfg.parallel.context_parallel_impl, accelerator.num_processes
    if size == 1:
        return ParallelLayout(accelerator.process_index, world)
    if world % size:
        raise StartError(f"parallel.context_parallel_size={size} does not divide the {world} processes of this launch")
    backend = config.attn_backend
    if backend != "flash" and not (backend == "auto" and accelerator.device.type == "cuda"):
        raise StartError(f"model.attn_backend={backend!r}: context parallelism runs flashlm's kernel; set "
                         "model.attn_backend: flash")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if impl == "ulysses" and (heads % size or (kv_heads % size and size % kv_heads)):
        raise StartError(f"parallel.context_parallel_impl='ulysses' splits heads over the {size} ranks: "
                         f"num_attention_heads={heads} must be a multiple of {size}, and num_key_value_heads="
                         f"{kv_heads} a multiple or a divisor of it; use ring or allgather")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(accelerator.device.type, (world // size, size), mesh_dim_names=("dp", "cp"))
    cp = ContextParallel(mesh.get_group("cp"), impl, cfg.parallel.context_parallel_balance)
    return ParallelLayout(mesh.get_local_rank("dp"), world // size, cp)


def build_model(cfg: Recipe, tokenizer):
    """A fresh model from ``model.preset``, or the weights ``init_from`` names (a Hugging Face
    Llama directory, a flashlm checkpoint or run directory), with ``model`` overrides applied.
    A fresh model takes its bos/eos/pad ids from the tokenizer unless the recipe sets them.
    Raises ``DataError`` when the tokenizer has more tokens than the model's vocabulary."""
    overrides = cfg.model.overrides
    if cfg.init_from is None:
        config = GPTConfig.from_preset(cfg.model.preset, **overrides)
        flashlm_data.check_tokenizer_fits(tokenizer, config.vocab_size)
        names = ("bos_token_id", "eos_token_id", "pad_token_id")
        token_ids = {name: getattr(tokenizer, name) for name in names if getattr(tokenizer, name) is not None}
        return GPT(GPTConfig.from_dict(config.to_dict() | token_ids | overrides))
    try:
        model = load_model(cfg.init_from, **overrides)
    except FileNotFoundError as e:
        raise StartError(f"init_from={cfg.init_from!r}: {e}") from e
    flashlm_data.check_tokenizer_fits(tokenizer, model.config.vocab_size)
    return model


def main(cfg: Recipe) -> dict[str, Any]:
    """Train according to ``cfg``. Returns a summary: final step, last train loss, eval loss
    and perplexity, the corpus's unigram entropy (nats/token), wall time, export directory."""
    start_time = time.perf_counter()
    run = setup(cfg)
    accelerator, model, optimizer, train_loader = run.accelerator, run.model, run.optimizer, run.train_loader
    t, out = cfg.training, Path(cfg.output_dir)
    step, tokens_seen = 0, 0
    if run.resume_from is not None:
        if is_sharded(model) and not is_sharded_checkpoint(run.resume_from):
            raise StartError(f"cannot resume from {run.resume_from}: it was written without FSDP2; resume it "
                             "with the launch config that wrote it, or start a new run from it with init_from")
        try:
            if is_sharded_checkpoint(run.resume_from):  # resharded to this model, sharded or not
                load_sharded(run.resume_from, model, optimizer)
            else:
                accelerator.load_state(str(run.resume_from))
        except Exception as e:  # a checkpoint written before checksums, truncated or altered
            raise StartError(f"cannot resume from {run.resume_from}: {type(e).__name__}: {e}") from e
        state = read_json(run.resume_from / TRAINER_STATE)
        step, tokens_seen = state["step"], state["tokens_seen"]
        train_loader.load_state_dict(state["data"])
        before = read_recipe(run.resume_from)["training"]["steps"]
        if before != t.steps:
            accelerator.print(f"training.steps changed from {before} to {t.steps}: the schedule now spans {t.steps} steps")

    # Inputs are valid: from here on the run writes into its output directory, holding its lock.
    metrics = lock = None
    if accelerator.is_main_process:
        try:
            lock = RunLock(out)
        except RunLockedError as e:
            raise StartError(str(e)) from e
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        if not (out / RUN_TOKENIZER).is_dir():  # export finds the tokenizer here, from any directory
            run.tokenizer.save_pretrained(out / RUN_TOKENIZER)
        metrics = MetricsLog(out / "metrics.jsonl", keep_through=step)
    _start_trackers(accelerator, cfg)
    unwrapped = accelerator.unwrap_model(model)
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * run.layout.dp_size
    flops_per_token = unwrapped.flops_per_token(t.seq_len)
    peak = peak_flops(accelerator.device, cfg)
    last_step = t.stop_at_step or t.steps
    accelerator.print(
        f"resolved recipe:\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}"
        f"model: {unwrapped.num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; "
        f"{tokens_per_step} tokens/step on {accelerator.num_processes} x {accelerator.device}{run.layout} "
        f"({accelerator.mixed_precision} mixed precision)\n"
        f"unigram entropy of the training tokens: {run.unigram_entropy:.3f} nats/token\n"
        + (f"resuming from {run.resume_from} at step {step}" if run.resume_from else "starting at step 0")
    )

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(record)
        accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def run_eval() -> float:
        loss = evaluate(model, _eval_batches(run), accelerator, t.eval_batches, t.document_mask, run.layout.cp)
        log({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
        accelerator.print(f"step {step}: eval loss {loss:.4f}, perplexity {math.exp(min(loss, 50.0)):.2f}")
        return loss

    def save_checkpoint() -> None:
        _check_finite(step, model, optimizer, run.checkpoints)
        trainer_state = {"step": step, "tokens_seen": tokens_seen, "data": train_loader.state_dict()}
        staging = run.checkpoints.staging_path(step)
        if accelerator.is_main_process:
            run.checkpoints.clear_staging(step)
        accelerator.wait_for_everyone()
        if is_sharded(model):
            save_sharded(staging, model, optimizer)  # every rank writes its own shards
        else:
            # Tied embeddings are stored once by design; accelerate warns about it on every save.
            with _log_level("accelerate.utils.other", logging.ERROR):
                accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            run.checkpoints.commit(step, trainer_state, cfg.to_dict(), unwrapped.config.to_dict())
        accelerator.wait_for_everyone()

    def log_memory(at_step: int) -> None:
        held = memory_report(model, optimizer)
        # The rest of the peak is what the step's forward and backward passes kept or made.
        peak = peak_memory_gb(accelerator.device) * 2**30 if accelerator.device.type == "cuda" else None
        held.activations = None if peak is None else max(int(peak) - held.weights - held.gradients - held.optimizer, 0)
        accelerator.print(f"memory per process after step {at_step}: {held.summary()}"
                          + ("" if peak is None else " (activations: the peak above the rest)"))
        log({"step": at_step, **{f"mem_{k}_gb": None if v is None else v / 2**30 for k, v in vars(held).items()}})

    start_step = step
    progress = _progress_bar(cfg, accelerator, initial=step, total=last_step)
    train_loss, skipped = None, 0
    eval_loss = run_eval() if step == 0 else None  # the untrained model's loss: ln(vocab) or so
    window_start, window_tokens = time.perf_counter(), 0
    while step < last_step:
        lr = lr_at(step, cfg.optim.lr, cfg.schedule, t.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(t.grad_accum_steps):
            for sub, (batch, weight) in enumerate(sub_batches(next(train_loader), run.split)):
                # Gradients are all-reduced only on the last pass of the accumulation.
                sync = micro == t.grad_accum_steps - 1 and sub == run.split - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = batch_loss(model, batch, t.document_mask, accelerator.device, run.layout.cp) * weight
                    accelerator.backward(loss / t.grad_accum_steps)
                loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        # One host sync per step (none per micro-step): both values are reduced over processes.
        bad = _nonfinite(loss_sum, grad_norm)
        if bad is not None:
            skipped += 1
            log({"step": step + 1, "skipped": True, "loss": bad[0], "grad_norm": bad[1]})
            if t.on_nonfinite == "stop" or skipped > t.max_skipped_steps:
                raise DivergedError(_diverged_message(step + 1, bad, t, skipped, run.checkpoints))
            accelerator.print(f"step {step + 1}: loss {bad[0]}, gradient norm {bad[1]}: step skipped, no update "
                              f"({skipped} of at most {t.max_skipped_steps} skipped)")
        else:
            optimizer.step()
        if step == start_step:  # what this process holds, once: the per-GPU memory of the run
            log_memory(step + 1)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        progress.update(1)

        if step % cfg.logging.log_every == 0 or step == last_step:
            train_loss = accelerator.reduce(loss_sum / t.grad_accum_steps, reduction="mean").item()
            tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            mfu = flops_per_token * tokens_per_s / (peak * accelerator.num_processes) if peak else None
            log({
                "step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_seen": tokens_seen, "tokens_per_s": tokens_per_s, "mfu": mfu,
                "peak_mem_gb": peak_memory_gb(accelerator.device),
            })
            progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            window_start, window_tokens = time.perf_counter(), 0
        # Evaluate before saving, so a resumed run never owes its checkpoint's step an evaluation.
        paused = time.perf_counter()
        if step == t.steps or (t.eval_every and step % t.eval_every == 0):
            eval_loss = run_eval()
        if step == last_step or (t.ckpt_every and step % t.ckpt_every == 0):
            save_checkpoint()
        window_start += time.perf_counter() - paused  # tokens/s counts training time only
    progress.close()

    if eval_loss is None and step == t.steps:  # resumed a finished run: report its final loss
        eval_loss = run_eval()
    export_dir = None
    if cfg.export.enabled and step == t.steps:
        export_dir = cfg.export_dir
        _check_finite(step, model, None, run.checkpoints)
        exported = unsharded_copy(model) if is_sharded(model) else unwrapped  # a collective when sharded
        if accelerator.is_main_process:
            # The run's own export is replaced when a resumed run finishes again.
            save_pretrained(exported, export_dir, tokenizer=run.tokenizer, overwrite=True)
            accelerator.print(f"exported a Hugging Face model to {export_dir}")
        accelerator.wait_for_everyone()
    accelerator.end_training()
    if lock is not None:
        lock.release()

    summary = {
        "step": step, "train_loss": train_loss, "eval_loss": eval_loss,
        "eval_ppl": None if eval_loss is None else math.exp(min(eval_loss, 50.0)),
        "unigram_entropy": run.unigram_entropy, "wall_time_s": time.perf_counter() - start_time,
        "output_dir": str(out), "export_dir": None if export_dir is None else str(export_dir),
    }
    if step == t.steps:
        accelerator.print(
            f"final eval loss {eval_loss:.3f} nats/token vs unigram entropy of the corpus "
            f"{run.unigram_entropy:.3f} nats/token ({summary['wall_time_s']:.0f} s)"
        )
    return summary


def _mixed_precision(t) -> str:
    if t.mixed_precision != "auto":
        return t.mixed_precision
    on_gpu = torch.cuda.is_available() and not t.cpu
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"


@contextlib.contextmanager
def _log_level(name: str, level: int):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _find_resume(cfg: Recipe, checkpoints: CheckpointManager) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; refuses to mix two runs."""
    existing = checkpoints.complete()
    if cfg.resume is False:
        if existing:
            raise StartError(
                f"output_dir {cfg.output_dir} already holds checkpoints of a run "
                f"(steps {', '.join(str(s) for s, _ in existing)}); pass --resume to continue that run, "
                "or choose another output_dir. Nothing was changed."
            )
        return None
    if cfg.resume is True:
        if not existing:
            raise StartError(f"--resume: no complete checkpoint in {checkpoints.root}")
        good = checkpoints.good()
        if not good:
            problems = "; ".join(f"{p.name}: {verify(p)}" for _, p in existing)
            raise StartError(f"--resume: no checkpoint in {checkpoints.root} verifies ({problems}). Nothing was changed.")
        path = good[-1][1]
        for _, bad in existing:
            if bad.name > path.name:
                logger.warning("not resuming from %s, which fails verification (%s); falling back to %s, the newest "
                               "good checkpoint", bad, verify(bad), path)
    else:
        try:
            path = resolve_checkpoint(cfg.resume)
        except (FileNotFoundError, CorruptCheckpointError) as e:
            raise StartError(f"--resume={cfg.resume}: {e}") from e
    resumed_step = read_json(path / TRAINER_STATE)["step"]
    if resumed_step > cfg.training.steps:
        raise StartError(f"cannot resume: {path} is at step {resumed_step}, past training.steps={cfg.training.steps}; "
                         "raise training.steps to continue training, or export the checkpoint. Nothing was changed.")
    recipe = cfg.to_dict()
    for other in {path, *(p for _, p in checkpoints.good()[-1:])}:
        diff = trajectory_diff(read_recipe(other), recipe)
        if diff:
            raise StartError(
                f"cannot resume: {other} belongs to a run whose recipe differs in {', '.join(diff)}; "
                "resume with the same recipe (only steps, stop_at_step, eval/checkpoint cadence, logging "
                "and export may change) or choose another output_dir. Nothing was changed."
            )
    return path


def _nonfinite(loss_sum, grad_norm) -> tuple[float, float] | None:
    """(loss, grad norm) as floats when either is NaN or infinite, else None: one host sync."""
    values = torch.stack([loss_sum.detach().float(), torch.as_tensor(grad_norm, device=loss_sum.device).float()])
    if bool(torch.isfinite(values).all()):
        return None
    return float(values[0]), float(values[1])


def _diverged_message(step: int, bad: tuple[float, float], t, skipped: int, checkpoints: CheckpointManager) -> str:
    good = checkpoints.good()
    where = (f"the last good checkpoint is {good[-1][1]} (continue with --resume, e.g. with a lower optim.lr)"
             if good else "no checkpoint was written before it")
    why = ("training.on_nonfinite=stop" if t.on_nonfinite == "stop"
           else f"{skipped} steps skipped, more than training.max_skipped_steps={t.max_skipped_steps}")
    return f"training diverged at step {step}: loss {bad[0]}, gradient norm {bad[1]} ({why}); {where}"


def _check_finite(step: int, model, optimizer, checkpoints: CheckpointManager) -> None:
    """Raise ``DivergedError`` if a weight (or an optimizer state tensor) is NaN or infinite, so
    that no checkpoint or export ever holds one."""
    tensors = [p.detach() for p in model.parameters()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if all_finite(tensors):  # shard by shard when sharded: a collective, as every caller is
        return
    good = checkpoints.good()
    where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was written before it"
    raise DivergedError(f"the model holds non-finite weights or optimizer state at step {step}: not saving it; {where}")


def _eval_batches(run: Run):
    return flashlm_data.build_eval_loader(run.data, batch_size=run.cfg.training.micro_batch_size, rank=run.layout.dp_rank,
                                          world_size=run.layout.dp_size)


def _start_trackers(accelerator, cfg: Recipe) -> None:
    if not cfg.logging.trackers:
        return
    run_name = cfg.logging.run_name or Path(cfg.output_dir).resolve().name
    # Tracker configs want scalars: flatten the recipe and stringify lists and None.
    flat = {}
    for section, value in cfg.to_dict().items():
        for key, v in (value.items() if isinstance(value, dict) else [("", value)]):
            flat[f"{section}.{key}" if key else section] = v if isinstance(v, (int, float, str, bool)) else str(v)
    init_kwargs = {"wandb": {"mode": cfg.logging.wandb_mode, "name": run_name, "dir": cfg.output_dir}}
    accelerator.init_trackers(cfg.logging.project, config=flat, init_kwargs=init_kwargs)


def _progress_bar(cfg: Recipe, accelerator, initial: int, total: int):
    from tqdm.auto import tqdm

    disable = not (cfg.logging.progress_bar and accelerator.is_main_process)
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, dynamic_ncols=True)


USAGE = """usage: flashlm train RECIPE.yaml [--section.key=value ...] [--resume[=CHECKPOINT]]

Train from a YAML recipe; overrides use the recipe's keys, e.g. --training.steps=100,
--optim.lr=1e-3, or --steps=100 when the key name is unique."""


def cli(argv: list[str]) -> int:
    """Parse ``RECIPE.yaml [--key=value ...]``, then run ``main``. Returns the exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        keys = "\n".join(f"  {section or '(top level)'}: {', '.join(names)}" for section, names in valid_keys().items())
        print(f"{USAGE}\n\nrecipe keys:\n{keys}")
        return 0 if argv else 2
    try:
        cfg = load_recipe(argv[0], argv[1:])
        main(cfg)
    except (RecipeError, StartError) as e:
        print(f"flashlm train: error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"flashlm train: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
