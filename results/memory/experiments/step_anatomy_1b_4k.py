"""Anatomy of one 1b training step at 4K (8 x 4096 tokens, bf16 autocast, fused AdamW) on a GPU:
HF + liger with and without gradient checkpointing, and flashlm under fixed checkpoint plans
(the sweep's planned one, nothing recomputed with and without the chunked MLP, everything
recomputed). Per case: step times, peak memory, device time by kernel category, and the
matrix products grouped by shape with their TFLOP/s; first, isolated GEMMs of the 1b shapes.
Writes $OUT/gemm_diag.json (step_anatomy_1b_4k_h100.json here).

    PYTHONPATH=<site with liger-kernel> OUT=/tmp python3 results/memory/experiments/step_anatomy_1b_4k.py
"""
import json, os, sys, time, statistics
import torch
sys.path.insert(0, "scripts/bench")
import memory_sweep as ms
from flashlm.model import GPT, GPTConfig

dev = torch.device("cuda")
OUT = os.environ.get("OUT", "/tmp")
ctx, batch = 4096, 8
res = {}

def mm_table(prof):
    rows = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        shp = e.input_shapes
        try:
            if e.key == "aten::mm":
                (m, k), (_, n) = shp[0], shp[1]
            elif e.key == "aten::addmm":
                (m, k), (_, n) = shp[1], shp[2]
            else:
                continue
        except Exception:
            continue
        us = e.self_device_time_total
        fl = 2 * m * k * n * e.count
        rows[f"{e.key} {shp}"] = (us / 1e3, e.count, fl / (us * 1e-6) / 1e12 if us else 0)
    return sorted(rows.items(), key=lambda kv: -kv[1][0])

def case(name, build, plan=None):
    torch.cuda.empty_cache()
    model, loss_fn, patches = build()
    if plan:
        model.set_checkpoint_plan(plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    def step():
        ids = torch.randint(0, 32000, (batch, ctx), device=dev, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(4):
        t = time.perf_counter(); step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                record_shapes=True) as prof:
        step(); torch.cuda.synchronize()
    br = ms.time_breakdown(prof, 1)
    mmt = mm_table(prof)
    tot_mm = sum(v[0] for _, v in mmt); tot_fl = sum(v[1] and v[2] * v[0] * 1e-3 for _, v in mmt)
    res[name] = dict(step_ms=[round(t * 1e3, 1) for t in ts], median_ms=statistics.median(ts) * 1e3, peak_gib=peak,
                     categories=br["category_ms"], busy=br["busy_ms"], mm=[(k, *v) for k, v in mmt[:25]],
                     mm_total_ms=tot_mm, mm_tflops=tot_fl / (tot_mm * 1e-3) if tot_mm else 0)
    print(f"== {name}: median {statistics.median(ts)*1e3:.1f} ms {ts} peak {peak:.1f} GiB busy {br['busy_ms']:.0f}", flush=True)
    print("   cats", {k: round(v, 1) for k, v in br["category_ms"].items()})
    print(f"   mm total {tot_mm:.1f} ms at {res[name]['mm_tflops']:.0f} TFLOP/s")
    for k, v in mmt[:18]:
        print(f"   {v[0]:7.2f} ms x{v[1]:4d} {v[2]:5.0f} TF/s  {k}")
    ops = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0),
                 key=lambda e: -e.self_device_time_total)[:14]
    print("   top ops:", "; ".join(f"{e.key} {e.input_shapes} x{e.count} {e.self_device_time_total/1e3:.1f}ms"[:150] for e in ops))
    patches.close(); del model, opt; torch.cuda.empty_cache()

def flash(**over):
    def b():
        cfg = GPTConfig.from_preset("1b", max_position_embeddings=ctx, **{**ms.AUTO_LEVERS, "checkpoint_memory_budget": 0.9, **over})
        with torch.device(dev):
            m = GPT(cfg)
        return m, lambda m, ids: m(ids, labels=ids).loss, __import__("contextlib").ExitStack()
    return b

def gemm_bench():
    print("== isolated GEMMs (bf16 in), TFLOP/s")
    M = ctx * batch
    out = {}
    for (n, k) in [(4096, 2048), (11264, 2048), (2048, 5632), (2048, 2048)]:
        x = torch.randn(M, k, device=dev, dtype=torch.bfloat16); w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        g = torch.randn(M, n, device=dev, dtype=torch.bfloat16); acc = torch.zeros(n, k, device=dev)
        ops = {"fwd x@W^T": lambda: torch.nn.functional.linear(x, w),
               "dgrad g@W": lambda: g.mm(w),
               "wgrad g^T@x bf16": lambda: g.t().mm(x),
               "wgrad g^T@x ->fp32": lambda: torch.mm(g.t(), x, out_dtype=torch.float32),
               "wgrad addmm into fp32": lambda: torch.addmm(acc, g.t(), x, out_dtype=torch.float32, out=acc)}
        for name, f in ops.items():
            for _ in range(3): f()
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(10): f()
            torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
            tf = 2 * M * n * k / dt / 1e12
            out[f"{n}x{k} {name}"] = tf
            print(f"   N={n:6d} K={k:5d} {name:24s} {dt*1e3:6.2f} ms {tf:5.0f}")
    res["gemm"] = out

gemm_bench()
case("hf_liger", lambda: ms.build("1b", "hf_liger", ctx, dev))
case("hf_liger_nockpt", lambda: ms.build("1b", "hf_liger_nockpt", ctx, dev))
case("flash_auto_plan", flash(), "11*offload,5*none")
case("flash_none", flash(), "16*none")
case("flash_none_nochunk", flash(mlp_chunk_size=0), "16*none")
case("flash_ckpt_all", flash(), "16*checkpoint")
json.dump(res, open(f"{OUT}/gemm_diag.json", "w"), indent=1)
