"""FSDP2 and DDP on CPU against one process on the same data, and sharded checkpoints that
change the number of processes.

Spawned gloo processes make the training loop's own calls (Accelerate's ``prepare``,
``backward`` and ``clip_grad_norm_``, on a model that ``flashlm.parallel.fsdp`` sharded, or
that Accelerate wrapped in DDP), and compare each step with a single-process reference computed
in the same process from the same initial weights and the same global batch. One spawn per
world size runs all of its checks; every rank writes what it found, and the tests read that:

- 2 and 4 processes: an FSDP2 and a DDP training step (loss, the clipped global gradient
  norm, the gathered gradients, the gathered weights after AdamW);
- 2 processes: FSDP2 with every memory lever (checkpointed layers with bf16 inputs offloaded,
  chunked MLP and loss) and with kept flash attention; bf16 compute with fp32 gradient
  reduction; the memory report; a sharded save after one step, and a resume at 2 processes
  that continues bit for bit;
- 4 processes: the 2-process checkpoint resharded on load (weights, evaluation, next step);
- 1 process (the test process, no process group): the checkpoint into a plain model, as export
  reads it.
"""

import datetime
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from conftest import CPU_PROCESSES
from flashlm import GPT, GPTConfig
from flashlm.parallel.fsdp import (activation_memory, all_finite, apply_fsdp, data_parallel_mesh, fsdp2_enabled,
                                   full_state_dict, memory_report, mixed_precision_policy, prepare_sharded,
                                   unsharded_copy)
from flashlm.training.sharded_checkpoint import (is_sharded_checkpoint, load_model_weights, load_sharded,
                                                 save_sharded)

pytestmark = CPU_PROCESSES

CONFIG = dict(attn_backend="sdpa")  # the debug preset, tied embeddings
LEVERS = dict(gradient_checkpointing=True, checkpoint_dtype="bfloat16", checkpoint_offload=True, mlp_chunk_size=24,
              loss_chunk_size=40)
KEPT_FLASH = dict(attn_backend="flash", num_hidden_layers=2, gradient_checkpointing=True,
                  checkpoint_keep_attention=True)
ROWS, SEQLEN = 4, 32  # the global batch: 2 rows per process at 2 processes, 1 at 4
CLIP = 0.5  # below the gradient norms of these steps, so clipping scales every gradient
LR = 3e-3
SPAWN_TIMEOUT_S = 240


def model_config(**overrides):
    return GPTConfig.from_preset("debug", **{**CONFIG, **overrides})


def fresh_model(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


def optimizer_for(model):
    # AdamW's first steps move each weight by about lr * g / (|g| + eps), so a gradient as small
    # as eps turns its rounding into a visible change of the weight; eps well above the rounding
    # of these gradients keeps the weights comparable at fp32 tolerance. Fused, as the training
    # loop's AdamW on a GPU.
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=1e-6, fused=True)


def global_batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 1024, (ROWS, SEQLEN), generator=generator)


EVAL_IDS = torch.randint(0, 1024, (ROWS, SEQLEN), generator=torch.Generator().manual_seed(7))


def evaluate(model):
    """The loss on EVAL_IDS, the whole batch on every rank."""
    model.eval()
    with torch.no_grad():
        loss = model(EVAL_IDS, labels=EVAL_IDS).loss
    model.train()
    return loss.item()


def reference_steps(config, steps, shards=1):
    """One process on the global batches: per step the loss, the global gradient norm, the
    clipped gradients and the weights after AdamW. With ``shards`` > 1 the gradient is the mean
    of the gradients of that many equal parts of the batch, as data parallel ranks sum it: the
    same step in another order of summation."""
    model = fresh_model(config)
    optimizer = optimizer_for(model)
    out = []
    for step in range(steps):
        loss = 0
        for ids in global_batch(step).chunk(shards):
            part = model(ids, labels=ids).loss / shards
            part.backward()
            loss = loss + part.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(dict(loss=loss, norm=norm, grads=grads,
                        weights={k: v.clone() for k, v in model.state_dict().items()}))
    return out


def mismatches(got, want, reordered):
    """What differs between a step's results ``got`` and the reference ``want`` by more than
    twice what summing the gradient in another order changes (``reordered``: ``reference_steps``
    with shards), plus 1e-5 of the value: the global norm, summed shard by shard, is an fp32 sum
    of a million squares in another order (on the debug model both it and the single-process
    norm are 3-7e-6 off the fp64 norm), and it scales every clipped gradient. A sharding bug
    (a per-shard norm, an unaveraged or bf16 reduction, a misplaced optimizer shard) is 1e-3 or
    more."""
    found = []
    for group in ("loss", "norm", "grads", "weights"):
        values = want[group] if isinstance(want[group], dict) else {group: want[group]}
        for name, ref in values.items():
            value = got[group].get(name) if isinstance(want[group], dict) else got[group]
            if value is None:
                found.append(f"{group}[{name}] missing")
                continue
            other = reordered[group][name] if isinstance(want[group], dict) else reordered[group]
            err, noise = (value - ref).norm().item(), (other - ref).norm().item()
            if err > 2 * noise + 1e-5 * ref.norm().item():
                found.append(f"{group}[{name}]: error {err:.2e}, reordered sums {noise:.2e}")
    return found


def compare_steps(got, config, world):
    """``mismatches`` of each step against the references at ``world`` shards."""
    want, reordered = reference_steps(config, len(got)), reference_steps(config, len(got), shards=world)
    return [f"step {i}: {m}" for i in range(len(got)) for m in mismatches(got[i], want[i], reordered[i])]


# Code that runs in the spawned processes.

def _local_rows(ids, rank, world):
    per = ids.shape[0] // world
    return ids[rank * per:(rank + 1) * per]


def _sharded(accelerator, config, seed=0, mp_policy=None):
    model = fresh_model(config, seed)
    apply_fsdp(model, data_parallel_mesh(accelerator), mp_policy)
    return prepare_sharded(accelerator, model, optimizer_for(model))


def _ddp(accelerator, config):
    model = fresh_model(config)
    return accelerator.prepare(model, optimizer_for(model))


def _gathered(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _train_step(accelerator, model, optimizer, step):
    """The loop's step on this rank's rows of the global batch; the results gathered."""
    ids = _local_rows(global_batch(step), accelerator.process_index, accelerator.num_processes)
    loss = model(ids, labels=ids).loss
    accelerator.backward(loss)
    norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
    named = accelerator.unwrap_model(model).named_parameters()
    grads = {name: _gathered(p.grad).clone() for name, p in named if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)  # every rank has as many tokens: the mean of means is the mean
    return dict(loss=mean_loss / accelerator.num_processes, norm=norm, grads=grads,
                weights={k: v.clone() for k, v in full_state_dict(model).items()})


def _run_steps(accelerator, model, optimizer, steps):
    return [_train_step(accelerator, model, optimizer, step) for step in range(steps)]


def _training_checks(accelerator, found):
    """FSDP2 and DDP, two steps each, against one process."""
    for name, build in (("fsdp2", _sharded), ("ddp", _ddp)):
        model, optimizer = build(accelerator, model_config())
        got = _run_steps(accelerator, model, optimizer, steps=2)
        found[f"{name}_steps"] = compare_steps(got, model_config(), accelerator.num_processes)


def _lever_checks(accelerator, found):
    """FSDP2 with the memory levers: the checkpointed layers recompute on gathered weights in the
    backward pass and their gradients reach the reduce-scatter."""
    for name, overrides in (("levers", LEVERS), ("kept_flash_attention", KEPT_FLASH)):
        config = model_config(**overrides)
        model, optimizer = _sharded(accelerator, config)
        got = _run_steps(accelerator, model, optimizer, steps=1)
        found[f"fsdp2_{name}"] = compare_steps(got, config, accelerator.num_processes)


def _bf16_check(accelerator, found):
    """bf16 compute, fp32 reduction: gradients kept in fp32, the RoPE tables not cast, and the
    gradients no further from the fp32 ones than a plain bf16 model's, times two."""
    ids = global_batch(0)
    grads = {}
    for precision in ("fp32", "bf16"):
        plain = fresh_model(model_config()).to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[precision]))
        plain(ids, labels=ids).loss.backward()
        grads[precision] = {name: p.grad.float() for name, p in plain.named_parameters()}
    model, optimizer = _sharded(accelerator, model_config(), mp_policy=mixed_precision_policy("bf16"))
    dtypes = {}
    model.layers[0].register_forward_pre_hook(
        lambda module, args: dtypes.update(x=str(args[0].dtype), cos=str(args[1].dtype)))
    local = _local_rows(ids, accelerator.process_index, accelerator.num_processes)
    accelerator.backward(model(local, labels=local).loss)
    problems = [f"inputs of a block: {dtypes}"] if dtypes != dict(x="torch.bfloat16", cos="torch.float32") else []
    for name, p in accelerator.unwrap_model(model).named_parameters():
        ref = grads["fp32"][name]
        err, plain_err = (_gathered(p.grad) - ref).norm(), (grads["bf16"][name] - ref).norm()
        if p.grad.dtype != torch.float32:
            problems.append(f"{name}: gradient in {p.grad.dtype}")
        elif err > 2 * plain_err + 1e-6 * ref.norm():
            problems.append(f"{name}: error {err:.3e} vs plain bf16 {plain_err:.3e}")
    optimizer.zero_grad(set_to_none=True)
    found["fsdp2_bf16"] = problems


def _memory_check(accelerator, found):
    """The report counts this rank's shards: half the weights at 2 processes, gradients of the
    same size, AdamW's two moments; checkpointed layers keep less than plain ones."""
    problems = []
    kept = {}
    for name, overrides in (("plain", {}), ("checkpointed", dict(gradient_checkpointing=True))):
        model, optimizer = _sharded(accelerator, model_config(**overrides))
        ids = _local_rows(global_batch(0), accelerator.process_index, accelerator.num_processes)
        with activation_memory(accelerator.device) as measured:
            loss = model(ids, labels=ids).loss
        kept[name] = measured.bytes
        accelerator.backward(loss)
        optimizer.step()
        report = memory_report(model, optimizer, activations=measured.bytes)
        full = sum(p.numel() * 4 for p in fresh_model(model_config()).parameters())
        if report.weights * accelerator.num_processes != full or report.gradients != report.weights:
            problems.append(f"{name}: {report} for {full} bytes of weights")
        if not 2 * report.weights <= report.optimizer <= 2 * report.weights + 4 * 64:
            problems.append(f"{name}: optimizer {report.optimizer} for weights {report.weights}")
    if not 0 < kept["checkpointed"] < kept["plain"]:
        problems.append(f"activations kept: {kept}")
    found["memory_report"] = problems


def _finite_check(accelerator, found):
    """``all_finite`` on sharded weights: one rank's NaN is every rank's verdict."""
    model, _ = _sharded(accelerator, model_config())
    params = list(model.parameters())
    problems = [] if all_finite(params) else ["finite weights reported non-finite"]
    if accelerator.process_index == accelerator.num_processes - 1:
        with torch.no_grad():
            params[3].to_local().view(-1)[0] = float("nan")
    if all_finite(params):
        problems.append("a NaN in the last rank's shard went unseen")
    found["all_finite"] = problems


def _save_and_resume_checks(accelerator, found, tmp):
    """Step 1, a sharded save, step 2; then a fresh model and optimizer load it and take step 2
    again, bit for bit."""
    model, optimizer = _sharded(accelerator, model_config())
    _train_step(accelerator, model, optimizer, step=0)
    save_sharded(tmp / "ckpt", model, optimizer)
    saved = {k: v.clone() for k, v in full_state_dict(model).items()}
    at_save = evaluate(model)
    copy = unsharded_copy(model)
    if accelerator.is_main_process:
        torch.save(saved, tmp / "saved_weights.pt")
        (tmp / "eval_at_save.json").write_text(json.dumps(at_save))
        same = all(torch.equal(copy.state_dict()[k], v) for k, v in saved.items())
        found["unsharded_copy"] = [] if same and evaluate(copy) == at_save else ["the copy differs"]
    continued = _train_step(accelerator, model, optimizer, step=1)

    resumed, resumed_optimizer = _sharded(accelerator, model_config(), seed=1)
    load_sharded(tmp / "ckpt", resumed, resumed_optimizer)
    problems = [] if evaluate(resumed) == at_save else ["evaluation after the load"]
    again = _train_step(accelerator, resumed, resumed_optimizer, step=1)
    problems += [f"{key} differs" for key in ("loss", "norm") if not torch.equal(again[key], continued[key])]
    problems += [f"weights[{k}] differ" for k, v in continued["weights"].items()
                 if not torch.equal(again["weights"][k], v)]
    found["resume_same_world"] = problems


def _resharded_load_checks(accelerator, found, tmp):
    """The 2-process checkpoint at this world size: the same weights and evaluation, and the
    next step (with the resharded optimizer state) as one process takes it."""
    model, optimizer = _sharded(accelerator, model_config(), seed=1)
    load_sharded(tmp / "ckpt", model, optimizer)
    saved = torch.load(tmp / "saved_weights.pt")
    loaded = full_state_dict(model)
    problems = [f"weights[{k}] differ" for k, v in saved.items() if not torch.equal(loaded[k], v)]
    at_save = json.loads((tmp / "eval_at_save.json").read_text())
    if evaluate(model) != at_save:
        problems.append(f"evaluation {evaluate(model)} vs {at_save} at the save")
    want = reference_steps(model_config(), steps=2)[1]
    reordered = reference_steps(model_config(), steps=2, shards=accelerator.num_processes)[1]
    problems += mismatches(_train_step(accelerator, model, optimizer, step=1), want, reordered)
    found["resharded_load"] = problems


def _checks_at_two(accelerator, tmp):
    found = {}
    _training_checks(accelerator, found)
    _lever_checks(accelerator, found)
    _bf16_check(accelerator, found)
    _memory_check(accelerator, found)
    _finite_check(accelerator, found)
    _save_and_resume_checks(accelerator, found, tmp)
    return found


def _checks_at_four(accelerator, tmp):
    found = {}
    _training_checks(accelerator, found)
    _resharded_load_checks(accelerator, found, tmp)
    return found


_CHECKS = {2: _checks_at_two, 4: _checks_at_four}


def _worker(rank, world, port, tmp):
    # What `accelerate launch` sets, so that Accelerate finds the process group made here.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S))
    try:
        found = _CHECKS[world](Accelerator(cpu=True), Path(tmp))
        (Path(tmp) / f"found_{world}_{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, tmp):
    """Run the checks of ``world`` processes; returns {check: problems} merged over the ranks."""
    context = mp.start_processes(_worker, args=(world, _free_port(), str(tmp)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} spawned processes did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    found = {}
    for rank in range(world):
        for check, problems in json.loads((tmp / f"found_{world}_{rank}.json").read_text()).items():
            found.setdefault(check, []).extend(f"rank {rank}: {p}" for p in problems)
    return found


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def at_two(checkpoint_dir):
    return _spawn(2, checkpoint_dir)


@pytest.fixture(scope="module")
def at_four(checkpoint_dir, at_two):  # loads the checkpoint that the 2-process run saved
    return _spawn(4, checkpoint_dir)


@pytest.mark.parametrize("check", ["fsdp2_steps", "ddp_steps", "fsdp2_levers", "fsdp2_kept_flash_attention",
                                   "fsdp2_bf16", "memory_report", "all_finite", "unsharded_copy",
                                   "resume_same_world"])
def test_two_processes(at_two, check):
    assert at_two[check] == []


@pytest.mark.parametrize("check", ["fsdp2_steps", "ddp_steps", "resharded_load"])
def test_four_processes(at_four, check):
    assert at_four[check] == []


def test_one_process_reads_the_sharded_checkpoint_without_a_process_group(at_two, checkpoint_dir):
    assert is_sharded_checkpoint(checkpoint_dir / "ckpt") and not dist.is_initialized()
    model = load_model_weights(checkpoint_dir / "ckpt", fresh_model(model_config(), seed=1))
    saved = torch.load(checkpoint_dir / "saved_weights.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.lm_head.weight is model.embed.weight
    assert evaluate(model) == json.loads((checkpoint_dir / "eval_at_save.json").read_text())


def test_mixed_precision_policy():
    bf16 = mixed_precision_policy("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype, bf16.cast_forward_inputs) == (torch.bfloat16, torch.float32, False)
    assert mixed_precision_policy("no").param_dtype is None
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        mixed_precision_policy("fp8")


@pytest.mark.parametrize("env, is_fsdp2, processes, expected", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False, 2, True),  # a CPU launch of an FSDP2 config
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, False, 2, False),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False, 1, False),
    ({}, False, 2, False),
    ({}, True, 2, True),
], ids=["cpu-fsdp2", "fsdp1", "one-process", "ddp", "accelerate-fsdp2"])
def test_fsdp2_enabled(monkeypatch, env, is_fsdp2, processes, expected):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert fsdp2_enabled(SimpleNamespace(is_fsdp2=is_fsdp2, num_processes=processes)) is expected


def test_load_model_weights_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no sharded model"):
        load_model_weights(tmp_path, fresh_model(model_config()))
