"""Scaling over several GPUs: data parallel, FSDP2 and context parallel, measured through the
real training loop, plus a numerics check of context-parallel attention and a real CP run.

Every measurement is an ``accelerate launch`` of ``python -m flashlm.training.train`` (random
order of the bundled corpus, repeated so the longest context has blocks to read) with the
configs in ``recipes/accelerate/`` and recipe overrides; the row reads the run's
``metrics.jsonl`` (``tokens_per_s`` of every step after the first, median; ``peak_mem_gb``;
the ``mem_*_gb`` breakdown) and stops the run once its last step is logged (no final
evaluation or checkpoint). Children get ``NCCL_NVLS_ENABLE=0`` (no NVLink multicast).

    part 1  DDP and FSDP2, presets 100m and 1b at 4K, 1 -> 2 -> 4 -> 8 GPUs: tokens/s per GPU,
            peak memory per GPU, efficiency = tokens/s per GPU / the one-process run's
            (the same method at one GPU; ideal scaling is 1.0). Bar: >= 0.9 for 1b FSDP2 at 8.
    part 2  context parallelism, 1b with every memory lever, FSDP2 over the CP group,
            ring / allgather / ulysses at N = 2, 4, 8, total context 256K..2M, dense (one
            causal mask over the packed row) and packed (document masking); tokens/s per GPU
            against the same model on one GPU at the same tokens per GPU (seq_len = context / N),
            and against Accelerate's own context parallelism (``accel_cp`` rows, below).
    part 3  numerics: bf16 context-parallel attention (each method) at 512K over N GPUs
            (torchrun, NCCL) against flashlm's kernel on the whole sequence on one GPU, both
            measured against an fp32 reference on sampled query rows; the CP error must be within
            2x the one-GPU kernel's error. Forward output only.
    part 4  a real run: the 100m ladder's 128K stage (recipes/longctx/100m_128k.yaml) on N GPUs
            with ring CP, next to the same stage on one GPU: loss curves (from the 100m preset when
            the 64K stage's checkpoint is not there, on the repeated bundled corpus when the code
            corpus is not built).

Accelerate's context parallelism (``ParallelismConfig(dp_shard_size=N, cp_size=N)``,
``accelerator.maybe_context_parallel``, accelerate 1.16) is torch's experimental
``context_parallel``: it replaces SDPA, so the ``accel_cp`` rows run the same GPT with
``attn_backend: sdpa`` (causal, no mask) in a small loop of their own (``--accel-cp-worker``),
because flashlm's trainer shards the model itself. It cannot be driven for packed documents
(torch's CP supports no attention mask: those rows are recorded "unsupported"), and Accelerate
turns FSDP2 and CP on only on CUDA, so the CPU dry run records them "unavailable".

Rows that cannot run (more GPUs than the machine has, out of memory, timeout, the time budget)
are recorded with their status. Results are written after every row: ``scale.json`` (the
provenance block of scripts/provenance.py, settings, rows), ``scale.md`` and ``scale.png``
(matplotlib optional). A rerun with the same ``--out`` keeps the rows already measured "ok" and
runs the rest, so a long plan is finished over several device calls:

    PYTHONPATH=. python scripts/bench/scale.py --parts 1 2 3 4 --gpus 1 2 4 8 --time-budget 540 --out results/scale
    PYTHONPATH=. python scripts/bench/scale.py --cpu-dry-run --parts 1 2 --out /tmp/scale   # CPU, 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for provenance
from provenance import add_commit_argument, describe, environment, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ACCEL = REPO / "recipes" / "accelerate"
K = 1024
METHODS_CP = ("ring", "allgather", "ulysses")
LEVERS = {"loss_chunk_size": 8192, "gradient_checkpointing": True, "checkpoint_dtype": "bfloat16",
          "checkpoint_keep_attention": True, "checkpoint_offload": True, "mlp_chunk_size": 16384}


def settings_for(args):
    """The sizes of a run: the GPU plan, or the CPU dry run's tiny stand-ins."""
    if args.cpu_dry_run:
        return dict(presets=["debug"], dp_seq=128, dp_batch=2, cp_contexts=[256, 512], steps=3,
                    model={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "intermediate_size": 128},
                    levers={"loss_chunk_size": 128, "gradient_checkpointing": True, "mlp_chunk_size": 128},
                    configs={"ddp": "cpu_2proc.yaml", "fsdp2": "cpu_2proc_fsdp2.yaml"},
                    numerics_seq=256, part4_seq=256, part4_steps=4, corpus_copies=1, timeout=240)
    return dict(presets=["100m", "1b"], dp_seq=4 * K, dp_batch=4, cp_contexts=[256 * K, 512 * K, 1024 * K, 2048 * K],
                steps=args.steps, model={}, levers=LEVERS, configs={"ddp": "multi_gpu.yaml", "fsdp2": "fsdp2.yaml"},
                numerics_seq=512 * K, part4_seq=128 * K, part4_steps=args.part4_steps, corpus_copies=16,
                timeout=args.row_timeout)


def corpus(out, copies):
    """The bundled corpus repeated ``copies`` times as one jsonl (the 2M-token rows need blocks)."""
    path = out / "data" / f"corpus_x{copies}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [line for f in sorted((REPO / "data" / "corpus").glob("*.jsonl"))
                 for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        path.write_text("\n".join(lines * copies) + "\n", encoding="utf-8")
    return path


def base_recipe(args, s, out, preset, seq_len, steps, batch=1, levers=None, docs="dense"):
    """A training recipe (dict) for one row: the preset with the run's overrides."""
    model = {"preset": preset, **s["model"], "attn_backend": "flash",
             "max_position_embeddings": max(seq_len, 4096), **(levers or {})}
    if args.cpu_dry_run:
        model["vocab_size"] = 4096
    return {
        "output_dir": str(out),
        "model": model,
        "data": {"path": str(corpus(Path(args.out), s["corpus_copies"])), "tokenizer": str(REPO / "data" / "tokenizer"),
                 "eval_docs": 1, "seed": 0, "cache_dir": str(Path(args.out) / "data" / "cache"),
                 "num_proc": 1 if args.cpu_dry_run else 8},
        "optim": {"lr": 3e-4, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 1, "min_lr_ratio": 0.1},
        "training": {"steps": steps, "micro_batch_size": batch, "grad_accum_steps": 1, "seq_len": seq_len,
                     "seed": 0, "cpu": bool(args.cpu_dry_run), "mixed_precision": "no" if args.cpu_dry_run else "bf16",
                     "eval_batches": 1, "document_mask": docs == "packed", "keep_last": 1},
        "logging": {"progress_bar": False, "log_every": 1},
    }


def child_env(args):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONSAFEPATH="1", PYTHONPATH=str(REPO))
    if args.cpu_dry_run:  # the interpreter, and no GPU: ranks above 0 must not look for CUDA device 1
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def launch_cmd(args, config, nproc, *rest):
    if nproc == 1 and not args.cpu_dry_run:
        config = "single_gpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
           "--num_processes", str(nproc)]
    if nproc == 1 and args.cpu_dry_run:  # one CPU process: no torchrun
        cmd = [sys.executable]
    return cmd + list(rest)


def run_child(cmd, env, timeout, metrics=None, last_step=None, log=None):
    """Run ``cmd`` in its own process group; stop it once ``metrics`` holds ``last_step``'s
    tokens/s (skipping the final evaluation and checkpoint). Returns (status, reason, seconds)."""
    start = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        status, reason = None, None
        while proc.poll() is None:
            if time.perf_counter() - start > timeout:
                status, reason = "timeout", f"over {timeout:.0f}s"
                break
            if metrics and last_step and any(r.get("step") == last_step and "tokens_per_s" in r
                                             for r in read_metrics(metrics)):
                status = "ok"
                break
            time.sleep(0.5)
        if proc.poll() is None:
            _stop(proc)
    if status is None:
        status = "ok" if proc.returncode == 0 else "error"
        if status == "error":
            tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
            oom = "out of memory" in tail.lower() or "OutOfMemoryError" in tail
            status = "oom" if oom else "error"
            reason = next((line for line in reversed(tail.splitlines()) if "Error" in line), f"exit {proc.returncode}")[:200]
    return status, reason, time.perf_counter() - start


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def read_metrics(path):
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def summarize(records, nproc):
    """Row fields from a run's metrics: median tokens/s after the first step (total and per
    GPU), the peak memory per GPU, the held-memory breakdown and the losses."""
    steps = [r for r in records if "tokens_per_s" in r]
    timed = steps[1:] or steps
    fields = {"steps_logged": len(steps), "losses": [r["loss"] for r in steps]}
    if timed:
        tps = statistics.median(r["tokens_per_s"] for r in timed)
        fields.update(tokens_per_s=tps, tokens_per_s_per_gpu=tps / nproc,
                      peak_mem_gb=max((r.get("peak_mem_gb") or 0) for r in steps))
    for r in records:
        fields.update({k: v for k, v in r.items() if k.startswith("mem_")})
    return fields


def train_row(args, s, row, recipe, config, nproc, overrides=()):
    """Launch one training row; returns the row's fields."""
    out = Path(args.out) / "runs" / row["id"]
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=False)
    out.mkdir(parents=True)
    recipe["output_dir"] = str(out)
    path = out.parent / f"{row['id']}.json"
    path.write_text(json.dumps(recipe))
    cmd = launch_cmd(args, config, nproc, "-m", "flashlm.training.train", str(path), *overrides)
    last = recipe["training"]["steps"]
    status, reason, seconds = run_child(cmd, child_env(args), s["timeout"], out / "metrics.jsonl", last,
                                        log=out.parent / f"{row['id']}.log")
    fields = summarize(read_metrics(out / "metrics.jsonl"), nproc)
    if status == "ok" and "tokens_per_s" not in fields:
        status, reason = "error", "no tokens/s in metrics.jsonl"
    if not args.keep_runs:
        subprocess.run(["rm", "-rf", str(out)], check=False)  # checkpoints of 1b are 16 GB
    return {"status": status, "reason": reason, "seconds": seconds, **fields}


def plan(args, s):
    """Rows in run order (each a dict with id, part and its parameters)."""
    rows, gpus = [], sorted(args.gpus)
    if 1 in args.parts:
        for preset in reversed(s["presets"]):  # 1b first: it carries the bar
            for method in [m for m in ("fsdp2", "ddp") if m in args.methods]:
                for n in gpus:
                    rows.append(dict(part=1, id=f"p1_{preset}_{method}_n{n}", preset=preset, method=method, gpus=n,
                                     seq_len=s["dp_seq"]))
    if 2 in args.parts:
        cp_gpus = [n for n in gpus if n > 1]
        for n in sorted(cp_gpus, reverse=True):  # the widest first: the headline
            for ctx in args.contexts or s["cp_contexts"]:
                for docs in args.docs:
                    if ctx // n not in [r.get("seq_len") for r in rows if r.get("method") == "single" and r["docs"] == docs]:
                        rows.append(dict(part=2, id=f"p2_single_{docs}_{ctx // n}", method="single", gpus=1,
                                         seq_len=ctx // n, docs=docs))
                    for method in [m for m in METHODS_CP if m in args.methods]:
                        rows.append(dict(part=2, id=f"p2_{method}_{docs}_n{n}_{ctx}", method=method, gpus=n,
                                         context=ctx, seq_len=ctx, docs=docs))
                    if "accel_cp" in args.methods:
                        rows.append(dict(part=2, id=f"p2_accel_cp_{docs}_n{n}_{ctx}", method="accel_cp", gpus=n,
                                         context=ctx, seq_len=ctx, docs=docs))
    if 3 in args.parts:
        n = max(gpus)
        for method in [m for m in METHODS_CP if m in args.methods]:
            rows.append(dict(part=3, id=f"p3_{method}_n{n}", method=method, gpus=n, seq_len=s["numerics_seq"]))
    if 4 in args.parts:
        rows.append(dict(part=4, id="p4_single", method="single", gpus=1, seq_len=s["part4_seq"]))
        rows.append(dict(part=4, id=f"p4_ring_n{max(gpus)}", method="ring", gpus=max(gpus), seq_len=s["part4_seq"]))
    return rows


def available_gpus(args):
    if args.cpu_dry_run:
        return 2
    import torch
    return torch.cuda.device_count()


def run_row(args, s, row):
    n = row["gpus"]
    if row["part"] == 1:
        recipe = base_recipe(args, s, None, row["preset"], row["seq_len"], s["steps"], batch=s["dp_batch"],
                             levers={"loss_chunk_size": s["levers"].get("loss_chunk_size", 4096)})
        return train_row(args, s, row, recipe, s["configs"][row["method"]], n)
    if row["part"] == 2:
        if row["method"] == "accel_cp":
            return accel_cp_row(args, s, row)
        recipe = base_recipe(args, s, None, s["presets"][-1], row["seq_len"], s["steps"], levers=s["levers"],
                             docs=row["docs"])
        overrides = [] if row["method"] == "single" else [
            f"--parallel.context_parallel_size={n}", f"--parallel.context_parallel_impl={row['method']}"]
        return train_row(args, s, row, recipe, s["configs"]["fsdp2"], n, overrides)
    if row["part"] == 3:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), "--numerics-worker", row["method"], "--seq", str(row["seq_len"]),
               "--out", args.out] + (["--cpu-dry-run"] if args.cpu_dry_run else [])
        result = Path(args.out) / "runs" / f"{row['id']}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
        env = dict(child_env(args), SCALE_RESULT=str(result))
        status, reason, seconds = run_child(cmd, env, s["timeout"], log=result.with_suffix(".log"))
        fields = json.loads(result.read_text()) if result.exists() else {}
        if status == "ok" and not fields.get("passed"):
            status, reason = "failed", "CP error above 2x the one-GPU kernel's"
        return {"status": status, "reason": reason, "seconds": seconds, **fields}
    return part4_row(args, s, row)


def part4_row(args, s, row):
    """The 100m 128K ladder stage through its own recipe, overridden only where its inputs are
    missing (no 64K checkpoint: the preset; no code corpus: the repeated bundled corpus)."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "longctx" / "100m_128k.yaml").read_text())
    notes = []
    if not (REPO / recipe["init_from"]).exists():
        recipe["init_from"] = None
        recipe["model"] = {"preset": "debug" if args.cpu_dry_run else "100m", **recipe["model"]}
        notes.append("from the 100m preset (no 64K checkpoint)")
    if not (REPO / recipe["data"]["path"]).exists():
        recipe["data"].update(path=str(corpus(Path(args.out), s["corpus_copies"])), tokenizer=str(REPO / "data" / "tokenizer"),
                              min_doc_tokens=0, cache_dir=str(Path(args.out) / "data" / "cache"))
        recipe["model"]["vocab_size"] = 4096
        notes.append("on the bundled corpus (no code corpus)")
    seq = s["part4_seq"]
    recipe["model"]["max_position_embeddings"] = max(seq, recipe["model"]["max_position_embeddings"])
    recipe["training"].update(seq_len=seq, steps=s["part4_steps"], eval_every=0, eval_batches=1, ckpt_every=0)
    recipe["schedule"]["warmup_steps"] = min(recipe["schedule"]["warmup_steps"], s["part4_steps"])
    recipe["logging"].update(log_every=1, progress_bar=False)
    recipe["export"] = {"enabled": False}
    if args.cpu_dry_run:
        recipe["model"].update(s["model"], loss_chunk_size=128, mlp_chunk_size=128, checkpoint_offload=False)
        recipe["training"].update(cpu=True, mixed_precision="no")
    overrides = [] if row["method"] == "single" else [
        f"--parallel.context_parallel_size={row['gpus']}", "--parallel.context_parallel_impl=ring"]
    fields = train_row(args, s, row, recipe, s["configs"]["fsdp2"], row["gpus"], overrides)
    return {**fields, "note": "; ".join(notes) or None}


def accel_cp_row(args, s, row):
    if row["docs"] == "packed":
        return {"status": "unsupported", "reason": "torch context_parallel (Accelerate's CP) takes no attention mask"}
    if args.cpu_dry_run:
        return {"status": "unavailable", "reason": "Accelerate enables FSDP2 and CP only on CUDA"}
    result = Path(args.out) / "runs" / f"{row['id']}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / "fsdp2.yaml"),
           "--num_processes", str(row["gpus"]), str(Path(__file__).resolve()), "--accel-cp-worker",
           "--seq", str(row["seq_len"]), "--out", args.out, "--steps", str(s["steps"])]
    env = dict(child_env(args), SCALE_RESULT=str(result))
    status, reason, seconds = run_child(cmd, env, s["timeout"], log=result.with_suffix(".log"))
    fields = json.loads(result.read_text()) if result.exists() else {}
    if status == "ok" and "tokens_per_s" not in fields:
        status, reason = "error", "no result"
    return {"status": status, "reason": reason, "seconds": seconds, **fields}


def accel_cp_worker(args):
    """One rank of an ``accel_cp`` row: the 1b GPT (SDPA attention, every memory lever that
    does not replace attention) under Accelerate's FSDP2 + context parallelism, random tokens."""
    import torch
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig

    from flashlm import GPT, GPTConfig

    n = int(os.environ["WORLD_SIZE"])
    acc = Accelerator(parallelism_config=ParallelismConfig(dp_shard_size=1, cp_size=n))
    levers = {k: v for k, v in LEVERS.items() if k not in ("checkpoint_keep_attention",)}
    config = GPTConfig.from_preset("1b", attn_backend="sdpa", max_position_embeddings=args.seq, **levers)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = acc.prepare(model, optimizer)
    gen = torch.Generator(device=acc.device).manual_seed(0)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (1, args.seq), device=acc.device, generator=gen)
        targets = torch.roll(ids, -1, 1)
        pos = torch.arange(args.seq, device=acc.device)[None]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with acc.maybe_context_parallel(buffers=[ids, targets, pos], buffer_seq_dims=[1, 1, 1],
                                        no_restore_buffers={ids, targets, pos}):
            loss = model(ids, targets=targets, position_ids=pos).loss
            acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:] or times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    peaks = acc.gather(torch.tensor([peak], device=acc.device)).max().item()
    if acc.is_main_process:
        Path(os.environ["SCALE_RESULT"]).write_text(json.dumps(
            {"tokens_per_s": args.seq / step_s, "tokens_per_s_per_gpu": args.seq / step_s / n, "peak_mem_gb": peaks,
             "step_s": step_s}))


def numerics_worker(args):
    """One rank of a part-3 row: bf16 context-parallel attention against flashlm's kernel on
    the whole sequence, both against fp32 on sampled query rows (fp16 on the CPU dry run)."""
    import torch
    import torch.distributed as dist

    from flashlm.parallel import context_parallel_attention, shard_sequence, unshard_sequence
    from flashlm.kernels.attention import flash_attn_func

    cpu = args.cpu_dry_run
    dist.init_process_group("gloo" if cpu else "nccl")
    rank = dist.get_rank()
    device = torch.device("cpu" if cpu else f"cuda:{int(os.environ['LOCAL_RANK'])}")
    if not cpu:
        torch.cuda.set_device(device)
    heads, heads_k, dim = (4, 2, 32) if cpu else (16, 8, 128)
    # The CPU interpreter's bf16 dot products are wrong (triton 3.9); its fp16 ones are right.
    dtype = torch.float16 if cpu else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.seq)
    q = torch.randn(*shape, heads, dim, device=device, generator=gen).to(dtype)
    k = torch.randn(*shape, heads_k, dim, device=device, generator=gen).to(dtype)
    v = torch.randn(*shape, heads_k, dim, device=device, generator=gen).to(dtype)
    group = dist.group.WORLD
    local = context_parallel_attention(*(shard_sequence(x, group, dim=1) for x in (q, k, v)), group,
                                       impl=args.numerics_worker, causal=True)
    cp = unshard_sequence(local.contiguous(), group, dim=1)
    result = {}
    if rank == 0:
        one = flash_attn_func(q, k, v, causal=True)
        rows = torch.linspace(0, args.seq - 1, min(args.seq, 2048), device=device).long()
        scale = dim ** -0.5
        err_cp = err_one = 0.0
        for h in range(heads):
            kh, vh = k[0, :, h // (heads // heads_k)].float(), v[0, :, h // (heads // heads_k)].float()
            for chunk in rows.split(256):
                s_ = (q[0, chunk, h].float() @ kh.T) * scale
                s_ = s_.masked_fill(torch.arange(args.seq, device=device)[None] > chunk[:, None], float("-inf"))
                ref = torch.softmax(s_, -1) @ vh
                err_cp = max(err_cp, (cp[0, chunk, h].float() - ref).abs().max().item())
                err_one = max(err_one, (one[0, chunk, h].float() - ref).abs().max().item())
        result = {"err_cp": err_cp, "err_one_gpu": err_one, "ratio": err_cp / max(err_one, 1e-12),
                  "passed": err_cp <= 2 * err_one + 1e-6, "sampled_rows": len(rows)}
        Path(os.environ["SCALE_RESULT"]).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def derive(rows):
    """Efficiencies and ratios between rows (in place)."""
    by = {r["id"]: r for r in rows}
    for r in rows:
        ok = r.get("status") == "ok" and r.get("tokens_per_s_per_gpu")
        if r["part"] == 1 and ok:
            base = by.get(f"p1_{r['preset']}_{r['method']}_n1") or by.get(f"p1_{r['preset']}_ddp_n1")
            if base and base.get("status") == "ok":
                r["efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        if r["part"] == 2 and ok and r["method"] != "single":
            base = by.get(f"p2_single_{r['docs']}_{r['context'] // r['gpus']}")
            if base and base.get("status") == "ok":
                r["vs_one_gpu"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
            accel = by.get(f"p2_accel_cp_{r['docs']}_n{r['gpus']}_{r['context']}")
            if r["method"] != "accel_cp" and accel and accel.get("status") == "ok":
                r["vs_accelerate_cp"] = r["tokens_per_s_per_gpu"] / accel["tokens_per_s_per_gpu"]


def fmt(r, key, spec):
    if r.get("status") != "ok":
        return r.get("status", "-")
    v = r.get(key)
    return "-" if v is None else format(v, spec)


def markdown(data):
    rows, env = data["rows"], data["environment"]
    lines = [f"Scaling over GPUs, {describe(env, 'triton', 'accelerate')}.", ""]
    p1 = [r for r in rows if r["part"] == 1]
    if p1:
        lines += ["## Data parallel and FSDP2 (4K context)", "",
                  "Efficiency = tokens/s per GPU / the same method's one-process tokens/s (ideal 1.0).", "",
                  "| preset | method | GPUs | tokens/s per GPU | peak GB per GPU | efficiency |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['method']} | {r['gpus']} | {fmt(r, 'tokens_per_s_per_gpu', ',.0f')} | "
                  f"{fmt(r, 'peak_mem_gb', '.2f')} | {fmt(r, 'efficiency', '.3f')} |" for r in p1]
        bar = [r for r in p1 if r["preset"] == "1b" and r["method"] == "fsdp2" and r["gpus"] == 8 and "efficiency" in r]
        if bar:
            lines += ["", f"Bar (1b FSDP2 at 8 GPUs >= 0.9): {bar[0]['efficiency']:.3f}, "
                      f"{'met' if bar[0]['efficiency'] >= 0.9 else 'NOT met'}."]
        lines.append("")
    p2 = [r for r in rows if r["part"] == 2]
    if p2:
        lines += ["## Context parallel (1b, every memory lever, FSDP2 over the CP group)", "",
                  "vs one GPU: tokens/s per GPU / one GPU's at seq_len = context / N (same tokens per GPU).", "",
                  "| method | docs | GPUs | context | tokens/s per GPU | peak GB per GPU | vs one GPU | vs Accelerate CP |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['docs']} | {r['gpus']} | {r['seq_len']} | {fmt(r, 'tokens_per_s_per_gpu', ',.0f')} | "
                  f"{fmt(r, 'peak_mem_gb', '.2f')} | {fmt(r, 'vs_one_gpu', '.3f')} | {fmt(r, 'vs_accelerate_cp', '.3f')} |"
                  for r in p2]
        lines.append("")
    p3 = [r for r in rows if r["part"] == 3]
    if p3:
        lines += ["## Numerics: bf16 CP attention vs the one-GPU kernel (max abs error vs fp32)", "",
                  "| method | GPUs | seq | CP error | one-GPU error | ratio | passed |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['gpus']} | {r['seq_len']} | {fmt(r, 'err_cp', '.3e')} | "
                  f"{fmt(r, 'err_one_gpu', '.3e')} | {fmt(r, 'ratio', '.2f')} | {r.get('passed', r['status'])} |" for r in p3]
        lines.append("")
    p4 = [r for r in rows if r["part"] == 4]
    if p4:
        lines += ["## 100m 128K stage: one GPU vs ring CP", "", "| run | steps | first loss | last loss | tokens/s |",
                  "|---|---|---|---|---|"]
        for r in p4:
            losses = r.get("losses") or []
            lines.append(f"| {r['id']} | {len(losses)} | {losses[0] if losses else '-'} | "
                         f"{losses[-1] if losses else '-'} | {fmt(r, 'tokens_per_s', ',.0f')} |")
        lines.append("")
    notes = [f"{r['id']}: {r['status']} ({r['reason']})" for r in rows if r.get("status") != "ok" and r.get("reason")]
    if notes:
        lines += ["Not measured: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def plot(data, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for (preset, method) in dict.fromkeys((r["preset"], r["method"]) for r in rows if r["part"] == 1):
        pts = sorted((r["gpus"], r.get("efficiency", float("nan"))) for r in rows
                     if r["part"] == 1 and r["preset"] == preset and r["method"] == method)
        axes[0].plot(*zip(*pts), marker="o", label=f"{preset} {method}")
    axes[0].axhline(0.9, color="gray", linestyle=":")
    axes[0].set(xlabel="GPUs", ylabel="scaling efficiency", title="DDP / FSDP2 at 4K")
    for key in dict.fromkeys((r["method"], r["docs"], r["gpus"]) for r in rows if r["part"] == 2 and r["method"] != "single"):
        pts = sorted((r["seq_len"], r.get("vs_one_gpu", float("nan"))) for r in rows if r["part"] == 2
                     and (r["method"], r["docs"], r["gpus"]) == key)
        axes[1].plot(*zip(*pts), marker="o", label=" ".join(map(str, key)))
    axes[1].set(xscale="log", xlabel="total context", ylabel="tokens/s per GPU / one GPU's", title="context parallel")
    for r in (r for r in data["rows"] if r["part"] == 4 and r.get("losses")):
        axes[2].plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["id"])
    axes[2].set(xlabel="step", ylabel="loss", title="100m 128K stage")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{data['environment']['gpu']}, {data['environment']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data, out, with_plot=False):
    derive(data["rows"])
    write_report(out, "scale", data, markdown(data))
    if with_plot:
        plot(data, out / "scale.png")


def main(args):
    if args.numerics_worker:
        return numerics_worker(args)
    if args.accel_cp_worker:
        return accel_cp_worker(args)
    out = Path(args.out)
    s = settings_for(args)
    previous = {}
    if (out / "scale.json").exists():  # a rerun keeps what was measured
        previous = {r["id"]: r for r in json.loads((out / "scale.json").read_text())["rows"] if r.get("status") == "ok"}
    data = {"environment": environment("cpu" if args.cpu_dry_run else "cuda", commit=args.commit),
            "settings": {**vars(args), "sizes": s}, "rows": []}
    have = available_gpus(args)
    deadline = time.perf_counter() + (args.time_budget or float("inf"))
    for row in plan(args, s):
        if row["id"] in previous:
            data["rows"].append(previous[row["id"]])
            continue
        if row["gpus"] > have:
            row.update(status="unavailable", reason=f"needs {row['gpus']} GPUs, the machine has {have}")
        elif time.perf_counter() + args.min_row_s > deadline:
            row.update(status="skipped", reason="time budget")
        else:
            s["timeout"] = min(s["timeout"], max(deadline - time.perf_counter(), 1))
            try:
                row.update(run_row(args, s, row))
            except Exception as e:  # noqa: BLE001 - one row's failure must not end the run
                row.update(status="error", reason=f"{type(e).__name__}: {e}"[:200])
        data["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        write(data, out)
    write(data, out, with_plot=True)
    print(markdown(data))
    return data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--methods", nargs="+", default=["fsdp2", "ddp", *METHODS_CP, "accel_cp"],
                   choices=["fsdp2", "ddp", *METHODS_CP, "accel_cp"], help="which methods' rows to run")
    p.add_argument("--contexts", nargs="+", type=int, help="part 2's total contexts (default 256K..2M)")
    p.add_argument("--docs", nargs="+", default=["dense", "packed"], choices=["dense", "packed"])
    p.add_argument("--time-budget", type=float, default=None, help="seconds: rows that would start later are skipped")
    p.add_argument("--min-row-s", type=float, default=45.0, help="a row is not started with less time than this left")
    p.add_argument("--row-timeout", type=float, default=300.0, help="seconds one GPU row may take")
    p.add_argument("--steps", type=int, default=5, help="training steps per row (the first is not timed)")
    p.add_argument("--part4-steps", type=int, default=300)
    p.add_argument("--out", default="results/scale")
    p.add_argument("--keep-runs", action="store_true", help="keep each row's run directory")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="two CPU processes (gloo), a tiny model, a few hundred tokens, the Triton interpreter")
    p.add_argument("--numerics-worker", choices=METHODS_CP, help=argparse.SUPPRESS)
    p.add_argument("--accel-cp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    add_commit_argument(p)
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        args.gpus = [n for n in args.gpus if n <= 2] or [1, 2]
    return args


if __name__ == "__main__":
    main(parse_args())
