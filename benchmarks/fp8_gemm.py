"""Where FP8 pays (issue 26): forward + backward of one Llama decoder layer's linear layers (q, k,
v, o, gate, up, down at the real shapes) in bf16 against torchao FP8, as training/model/fp8.py
converts them. Prints one JSON line per case; fills core/precision.py's table.

    python benchmarks/fp8_gemm.py                          # 1B and 8B shapes, 2k-32k tokens (~90 s on an H200)
    python benchmarks/fp8_gemm.py --models 8b --tokens 8192 --compile off
    python benchmarks/fp8_gemm.py --models 8b --modes frozen --recipes tensorwise --profile   # where the time goes

Cases: model (1b: hidden 2048, intermediate 8192; 8b: 4096, 14336) x tokens per micro-batch x
mode (full: trainable weights, all three GEMMs; frozen: a LoRA base, the input's gradient only)
x FP8 recipe (tensorwise, rowwise; frozen also torchao's own Float8Linear, which computes and
drops the weight's gradient: what FrozenFloat8Linear saves) x torch.compile (off / on: the
whole layer compiled, dynamic token count, one compile per configuration). Each line: ms
(median of --iters after --warmup; the first warm-up call compiles), the bf16 ms of the same mode and compile setting, speedup
= bf16 ms / ms. Casts and the MLP's SiLU-gate are in the timed region (they are in the step).
--budget-s stops starting new cases after that many seconds (a line says which were skipped).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

MODELS = {"1b": (2048, 8192, 2048, 512), "8b": (4096, 14336, 4096, 1024)}   # hidden, intermediate, q, kv


class Linears(torch.nn.Module):
    """One decoder layer's projections; attention itself is left out (it does not change)."""

    def __init__(self, hidden, inter, q, kv):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)   # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(hidden, q), lin(hidden, kv), lin(hidden, kv), lin(q, hidden)
        self.gate_proj, self.up_proj, self.down_proj = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)

    def forward(self, x):
        h = x + self.o_proj(self.q_proj(x))
        out = h + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return out, self.k_proj(x), self.v_proj(x)


def build(model: str, mode: str, recipe: str):
    """A `layers.0` holding one layer's linears, converted as zerotune converts them."""
    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList([Linears(*MODELS[model])])
    root = root.to("cuda", torch.bfloat16)
    if mode == "frozen":
        root.requires_grad_(False)
    if recipe == "torchao-linear":      # torchao's Float8Linear even for the frozen weight
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        convert_to_float8_training(root, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    elif recipe != "bf16":
        from zerotune.training.model import fp8
        fp8.convert(root, recipe=recipe)
    return root.layers[0]


def make_step(fn, layer, tokens: int, hidden: int):
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, k, v = fn(x)
        torch.autograd.backward((out, k, v), (torch.ones_like(out), torch.ones_like(k), torch.ones_like(v)))
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def time_case(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_case(step, steps: int = 3, top: int = 8) -> dict:
    """Where one step's time goes: the CPU time to issue it (launch-bound if near the step's ms), the
    GPU kernels' total, and the `top` kernels by GPU time, each per step."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    cpu_ms = (time.perf_counter() - t0) * 1e3 / steps
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {"issue_ms": round(cpu_ms, 3),
            "kernels_ms": round(sum(e.self_device_time_total for e in kernels) / 1e3 / steps, 3),
            "top": [[e.key[:100], round(e.self_device_time_total / 1e3 / steps, 3), e.count // steps] for e in kernels[:top]]}


def groups(a):
    """(compiled, model, mode, recipe): one layer built (and compiled once, dynamic token count) per
    group, timed at every token count. bf16 first: its times are the FP8 lines' baselines."""
    for compiled in a.compile:
        for model in a.models:
            for mode in a.modes:
                extra = ["torchao-linear"] if mode == "frozen" else []
                for recipe in ["bf16", *a.recipes, *extra]:
                    yield compiled, model, mode, recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1b,8b", help="comma-separated: 1b, 8b")
    p.add_argument("--tokens", default="2048,8192,16384,32768", help="tokens per micro-batch, comma-separated")
    p.add_argument("--recipes", default="tensorwise,rowwise", help="torchao float8 recipes")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both")
    p.add_argument("--modes", default="full,frozen", help="comma-separated: full, frozen")
    p.add_argument("--profile", action="store_true", help="add each case's issue time and top GPU kernels")
    p.add_argument("--quantize", choices=("product", "static", "eager"), default="product",
                   help="the kept-weight path's per-call casts: zerotune's (fp8_frozen.quantize_fast), compiled once "
                        "per shape, or eager (what a change there would give)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=85.0, help="start no new case after this many seconds")
    a = p.parse_args(argv)
    a.models, a.recipes, a.modes = a.models.split(","), a.recipes.split(","), a.modes.split(",")
    a.tokens = [int(t) for t in a.tokens.split(",")]
    a.compile = {"off": [False], "on": [True], "both": [False, True]}[a.compile]
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print(json.dumps({"error": "needs a CUDA GPU with FP8 (compute capability 8.9+)"}))
        return 1
    if a.quantize != "product":
        from zerotune.training.model import fp8_frozen
        fp8_frozen.quantize_fast = {"static": torch.compile(fp8_frozen.quantize, dynamic=False),
                                    "eager": fp8_frozen.quantize}[a.quantize]
    t0, base, skipped = time.monotonic(), {}, []
    device = torch.cuda.get_device_name()
    for compiled, model, mode, recipe in groups(a):
        name = f"{model}/{mode}/{recipe}/{'compiled' if compiled else 'eager'}"
        if time.monotonic() - t0 > a.budget_s:
            skipped.append(name)
            continue
        torch._dynamo.reset()
        layer = build(model, mode, recipe)
        fn = torch.compile(layer, dynamic=True) if compiled else layer
        for tokens in a.tokens:
            step = make_step(fn, layer, tokens, MODELS[model][0])
            ms = time_case(step, a.warmup, a.iters)
            key = (compiled, model, tokens, mode)
            if recipe == "bf16":
                base[key] = ms
            ref = base.get(key)
            print(json.dumps({"model": model, "hidden": MODELS[model][0], "intermediate": MODELS[model][1],
                              "tokens": tokens, "mode": mode, "recipe": recipe, "compile": compiled,
                              "ms": round(ms, 3), "bf16_ms": ref and round(ref, 3),
                              "speedup": ref and round(ref / ms, 3), "device": device,
                              **(profile_case(step) if a.profile else {})}), flush=True)
        del fn, layer
        torch.cuda.empty_cache()
    if skipped:
        print(json.dumps({"skipped_over_budget": skipped, "budget_s": a.budget_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
