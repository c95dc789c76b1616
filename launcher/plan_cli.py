"""`zerotune plan RECIPE`: the planner's table for a recipe (launcher/plan.py holds the planner),
the data it is planned for (the tokenized cache's real lengths when it is there), what the recipe's
`auto` keys resolve to, and what a checkpoint costs."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

from zerotune.core.checkpoint_cost import SAVE_OVERHEAD_S, WRITE_BYTES_PER_S, checkpoint_bytes, save_seconds
from zerotune.core.flops import PEAK_TFLOPS, num_params, shape
from zerotune.core.io import GIB
from zerotune.core.memory import RESERVED, Estimate, Strategy, Workload
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import load_recipe

from .data_size import as_written, cached_lengths
from .plan import pick_micro_batch, plan, recommend, sp_hint, workload
from .plan_layers import Levers, longest_sequence, planned_cpu_memory

HELP = "estimate memory, speed and cost of each strategy and recommend the fastest that fits"
DESCRIPTION = """\
Estimate per-GPU memory (parameters, gradients, optimizer states, activations, logits,
temporary buffers), CPU memory for offload, tokens/s, wall time, GPU-hours and cost for each
strategy (ZeRO-1/2/3, optimizer/parameter offload, LoRA, QLoRA, gradient checkpointing on/off)
and recommend the fastest that fits; the `auto:` line says what `zerotune train` resolves this
recipe's auto keys to (distributed.zero, gradient checkpointing by the layer, loss, tiling, offload;
the keys the recipe fixes kept).
Micro-batches are planned for the data's longest row when its tokenized cache is there (`zerotune
data prepare RECIPE`, or an earlier train, writes it), else for data.max_len.

  zerotune plan recipes/demo.yaml --gpus 8 --nodes 2 --gpu-memory 80GB --price 2.5
"""


# --------------------------------------------------------------------------- strategies
def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: cluster.gpus_per_node or 1)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: cluster.nodes)")
    p.add_argument("--gpu-memory", default=None, help="memory of one GPU (default: the local GPUs' (nvidia-smi), "
                   "else cluster.gpu_memory, else 80GB, assumed)")
    p.add_argument("--cpu-memory", default=None, help="CPU memory per node (default: cluster.mem, else this "
                   "machine's (/proc/meminfo) when its GPUs are planned for, else 512GB)")
    p.add_argument("--gpu-type", default="h100", choices=sorted(PEAK_TFLOPS), help="for peak FLOP/s (default h100)")
    p.add_argument("--price", type=float, default=None, help="price of one GPU-hour, for the cost column")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _hours(h: Optional[float]) -> str:
    if h is None:
        return "?"
    if h < 1 / 60:
        return f"{h * 3600:.0f}s"
    return f"{h * 60:.0f}m" if h < 1 else f"{h:.1f}h"


def format_table(rows: list[Estimate], w: Workload, best: Optional[Estimate], gpu_memory: float,
                 longest: Optional[dict] = None) -> str:
    """The table; `longest`: {strategy: (tokens on the GPU alone, tokens with host offload)}, a column."""
    head = ["strategy", "params", "grads", "optim", "activ", "logits", "temp", "GPU GiB", "CPU GiB/node",
            "fits", "tok/s/GPU", "time", "GPU-h", "cost"] + (["longest seq GPU / +host"] if longest else [])
    lines = [head]
    for r in rows:
        lines.append([r.label, _gib(r.params), _gib(r.grads), _gib(r.optimizer), _gib(r.activations),
                      _gib(r.logits), _gib(r.temporary), _gib(r.total), _gib(r.cpu_per_node),
                      "yes" if r.fits else "NO", f"{r.tokens_per_s:,.0f}", _hours(r.hours),
                      (f"{r.gpu_hours:.1f}" if r.gpu_hours >= 10 else f"{r.gpu_hours:.2f}")
                      if r.gpu_hours is not None else "?",
                      f"{r.cost:,.2f}" if r.cost is not None else "-"] +
                     ([" / ".join(f"{n:,}" for n in longest[r.strategy])] if longest else []))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)) for row in lines]
    s = shape(w.model)
    out.insert(0, f"model: {num_params(w.model) / 1e9:.2f}B parameters (d={s['d']}, layers={s['layers']}, "
                  f"vocab={s['vocab']}), {w.dtype}; {w.world} GPU(s) = {w.nodes} node(s) x {w.gpus_per_node}, "
                  f"{gpu_memory / GIB:.0f} GiB each; micro-batch {w.micro_batch_size} x {w.seq_len} tokens" +
                  (f", sequence parallel {w.sequence_parallel} ({w.seq_len // w.sequence_parallel:,} tokens per GPU)"
                   if w.sequence_parallel > 1 else ""))
    out.insert(1, f"data: {w.data_note}" + (f" = {w.train_tokens / 1e6:,.1f}M tokens" if w.train_tokens else ""))
    out.insert(2, "")
    misfits = [r for r in rows if not r.fits]
    if misfits:
        width = max(len(r.label) for r in misfits)
        out += ["", "why NO:"] + [f"  {r.label.ljust(width)}  {r.why_not}" for r in misfits]
    out.append("")
    if longest:
        out.append("longest seq: the longest data.max_len one sample fits at, the planner free to checkpoint by "
                   "the layer and tile the MLP (GPU), and also to offload checkpoints to CPU memory (+host).")
    out.append("ckpt k/L: the first k of L decoder layers checkpointed (recomputed), the fewest that fit where "
               "train.gradient_checkpointing is auto; the rest keep their activations.")
    out.append("GPU GiB = params + grads + optim + temp + kept activations + max(uncheckpointed layers' activations "
               "+ logits, one layer's recompute);"
               f" fits leaves {RESERVED / GIB:.1f} GiB for CUDA/NCCL." +
               (" CPU GiB/node includes a background save's snapshot (checkpoint.async_save)." if w.async_save else ""))
    out.append("Speed from MFUs zerotune measured on one H200 (core/speed.py MEASURED, benchmarks/results/);"
               " rows without a measurement use the older peer calibration or assumed values.")
    if best is not None:
        out.append(f"recommended: {best.label} ({best.tokens_per_s:,.0f} tokens/s/GPU, "
                   f"{_gib(best.total)} GiB per GPU)  ->  " + " ".join(f"--set {o}" for o in best.overrides()))
    else:
        out.append("recommended: nothing fits; add GPUs or nodes, lower micro_batch_size or max_len, or use LoRA/QLoRA")
    return "\n".join(out)


def checkpoint_line(w: Workload, st: Strategy) -> str:
    """What a save of the recommended strategy costs, and the stop-signal lead time it sets."""
    from .submit import STOP_MARGIN_S
    seconds = save_seconds(w, st)
    return (f"checkpoint: ~{checkpoint_bytes(w, st) / GIB:,.1f} GiB a save, ~{seconds:,.0f} s to write (assumed: "
            f"{WRITE_BYTES_PER_S / GIB:.0f} GiB/s per node plus {SAVE_OVERHEAD_S:.0f} s of barriers and fsyncs); "
            "a Slurm job gets its stop signal "
            f"{int(STOP_MARGIN_S + seconds)} s before its time limit (that + {STOP_MARGIN_S} s)")


def auto_line(recipe, gpus: int, nodes: int, gpu, cpu_memory: float) -> Optional[str]:
    """What `zerotune train` resolves the recipe's `auto` keys to on this GPU (launcher/prepare.py
    plan_auto, as train plans them: the keys the recipe fixes stay), or its refusal. The table's
    "recommended" is the fastest row of all, whatever the recipe fixes."""
    from .prepare import plan_auto
    try:
        _, pick = plan_auto(recipe, gpus, nodes, gpu, cpu_memory)
    except RecipeError as e:
        return f"auto: {e}"
    if pick is None:
        return None
    return (f"auto: this recipe as written trains with {pick.label}, {'the chunked' if pick.fused_loss else 'the plain'} "
            f"loss ({pick.tokens_per_s:,.0f} tokens/s/GPU, {_gib(pick.total)} GiB per GPU): what `zerotune train` resolves")


def run(args) -> int:
    from .gpus import planned_gpu_memory
    recipe = load_recipe(args.recipe, args.set)
    gpus = args.gpus or recipe.cluster.gpus_per_node or 1
    nodes = args.nodes or recipe.cluster.nodes
    gpu = planned_gpu_memory(recipe, args.gpu_memory)
    gpu_memory = gpu.bytes
    cpu_memory = planned_cpu_memory(recipe, args.cpu_memory, local=gpu.where == "gpus")
    lengths, why = cached_lengths(recipe)   # the data's real lengths, as `zerotune train` plans (data_size.py)
    written = recipe
    planning = lengths.planning_recipe(recipe) if lengths else recipe
    recipe = pick_micro_batch(planning, gpus, nodes, gpu_memory, cpu_memory)
    data_lines = (lengths.lines(as_written(recipe, written)) if lengths else
                  [f"data: planned for micro-batches of {recipe.train.micro_batch_size} x data.max_len "
                   f"{written.data.max_len:,} tokens: {why}; plan then reads the data's real lengths, as train does"])
    w = workload(recipe, gpus, nodes)
    auto = auto_line(planning, gpus, nodes, gpu, cpu_memory)
    rows = plan(w, recipe.method.kind, gpu_memory, cpu_memory, args.price, args.gpu_type, levers=Levers.of(recipe.train))
    best = recommend(rows, recipe.method.kind)
    longest = {r.strategy: tuple(longest_sequence(w, r.strategy, gpu_memory, cpu_memory, host)[0]
                                 for host in (False, True)) for r in rows}
    if args.json:
        print(json.dumps({"workload": {k: v for k, v in asdict(w).items() if k != "model"}, "data": data_lines, "auto": auto,
                          "recommended": best.strategy.label if best else None,
                          "rows": [{**asdict(r), "strategy": r.label, **asdict(r.strategy),
                                    "longest_seq_gpu": longest[r.strategy][0],
                                    "longest_seq_host": longest[r.strategy][1]} for r in rows]},
                         indent=1))
    else:
        print(f"GPU memory: {gpu.describe()}")
        print("\n".join(data_lines))
        print(format_table(rows, w, best, gpu_memory, longest))
        if auto:
            print(auto)
        if best is None:
            print(f"long sequences: {sp_hint(w, recipe.method.kind, gpu_memory, cpu_memory, Levers.of(recipe.train))}")
        else:
            print(checkpoint_line(w, best.strategy))
    return 0 if best is not None else 1
