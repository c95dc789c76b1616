"""Peak GPU memory and tokens/s of zerotune's own training path, next to `zerotune plan`'s estimate.

Runs the workloads of benchmarks/README.md on one GPU with random-initialised
Llama-3-shaped models (built from a config, saved once under --models) and random tokens
(no padding): the model and engine come from zerotune.training.model.build.build_model and
training.engine.build_engine with the ds_config launcher/ds_config.py renders, and each
step is the loop's own (training/run/step.py forward_backward + diagnostics.optimizer_step).
Every workload runs in a fresh process; one JSON line per workload:

    {"workload": "full-1b-zero3", "peak_gib": 43.9, "estimate_gib": 43.9, "error_pct": 0.1,
     "tokens_per_s": 27000, "mfu": 0.21, ...}

    python benchmarks/measure_memory.py                    # all four, about 5-6 minutes on an H100
    python benchmarks/measure_memory.py full-1b-zero3      # one of them

docs/plan_vs_measured.md records the results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import SIZES, make_model, model_dir  # noqa: E402  one random-model builder for every benchmark

WORKLOADS = {
    "full-1b-zero3": dict(size="1b", mbs=8, method="full", zero=3),
    "full-1b-zero3-offload": dict(size="1b", mbs=8, method="full", zero=3, offload=True),
    "lora-8b": dict(size="8b", mbs=4, method="lora", zero=0),
    "qlora-8b": dict(size="8b", mbs=4, method="qlora", zero=0, optimizer="paged_adamw_8bit"),
}
SMOKE = {"smoke-tiny": dict(size="tiny", mbs=2, method="full", zero=3)}  # CPU: python ... smoke-tiny
SEQ = 2048


def random_model(size: str, models: Path) -> Path:
    """bench_setup's random-initialised model folder for `size`, made once."""
    path = model_dir(models, size)
    if not (path / ".done").is_file():
        make_model(size, path)
    return path


def recipe_for(name: str, model_path: Path):
    from zerotune.core.recipe_load import validate_recipe
    w = {**WORKLOADS, **SMOKE}[name]
    return validate_recipe({
        "name": name, "output_dir": "/tmp/zerotune-measure",
        "model": {"path": str(model_path), "dtype": "bf16", "attn_implementation": "sdpa"},
        "method": {"kind": w["method"], "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
        "data": {"train": [{"path": "random-tokens", "format": "text"}], "max_len": SEQ},
        "train": {"max_steps": 100, "micro_batch_size": w["mbs"], "grad_accum": 1, "lr": 1e-5, "warmup_steps": 0,
                  "gradient_checkpointing": True, "optimizer": w.get("optimizer", "adamw")},
        "distributed": {"zero": w["zero"], "offload_optimizer": w.get("offload", False),
                        "offload_params": w.get("offload", False)},
    })


def measure(name: str, models: Path, steps: int, warmup: int) -> dict:
    """One workload in this process (the parent starts one process per workload)."""
    import deepspeed
    import torch

    from zerotune.launcher import ds_config as dsc
    from zerotune.launcher import plan
    from zerotune.training.run.diagnostics import optimizer_step
    from zerotune.training.run.engine import build_engine
    from zerotune.training.model.build import build_model
    from zerotune.training.run.step import forward_backward

    w = {**WORKLOADS, **SMOKE}[name]
    recipe = recipe_for(name, random_model(w["size"], models))
    cfg = dsc.render(recipe, world_size=1)
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed()
    model = build_model(recipe, cfg)
    engine = build_engine(model, cfg, recipe.train, total_steps=steps)
    engine.train()  # as the loop does: gradient checkpointing only acts in train mode
    vocab = SIZES[w["size"]]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    seq = SEQ if cuda else 128
    ids = torch.randint(0, vocab, (w["mbs"], seq), generator=g).to(engine.device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    n_target = w["mbs"] * (seq - 1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = forward_backward(engine, [batch], n_target, world=1)   # the loop's own step (training/run/step.py)
        optimizer_step(engine, skip=False)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        del loss
    step_s = sorted(times)[len(times) // 2]
    tps = w["mbs"] * seq / step_s
    model_cfg = json.loads((random_model(w["size"], models) / "config.json").read_text())
    wl = plan.Workload(model=model_cfg, micro_batch_size=w["mbs"], seq_len=seq, optimizer=recipe.train.optimizer)
    st = plan.Strategy(w["method"], w["zero"], w.get("offload", False), w.get("offload", False))
    est = plan.estimate_memory(wl, st)
    from zerotune.core.flops import flops_per_token
    from zerotune.core.flops import peak_tflops_of
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    return {"workload": name, "peak_gib": round(peak, 2) if cuda else None,
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2) if cuda else None,
            "estimate_gib": round(est["total"] / 2 ** 30, 2),
            "error_pct": round(100 * (est["total"] / 2 ** 30 - peak) / peak, 1) if cuda else None,
            "estimate_split_gib": {k: round(v / 2 ** 30, 2) for k, v in est.items() if k not in ("trainable", "total")},
            "tokens_per_s": round(tps), "step_s": round(step_s, 3),
            "mfu": round(tps * flops_per_token(model_cfg, seq) / (peak_tflops_of(torch.cuda.get_device_name()) * 1e12), 4)
            if cuda and peak_tflops_of(torch.cuda.get_device_name()) else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"any of {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--models", type=Path, default=Path("/tmp/zerotune-models"), help="where random models are saved")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.workloads = a.workloads or list(WORKLOADS)
    unknown = [w for w in a.workloads if w not in WORKLOADS and w not in SMOKE]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if a.one:  # child: one workload, one JSON line
        print("RESULT " + json.dumps(measure(a.workloads[0], a.models, a.steps, a.warmup)), flush=True)
        return 0
    for i, name in enumerate(a.workloads):
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + i), TOKENIZERS_PARALLELISM="false")
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, name, "--one", "--models", str(a.models),
                               "--steps", str(a.steps), "--warmup", str(a.warmup)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(json.dumps({"workload": name, "error": (proc.stderr or proc.stdout).strip()[-1500:]}), flush=True)
            continue
        result = json.loads(lines[-1])
        result["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
