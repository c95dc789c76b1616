"""`zerotune plan RECIPE`: per-GPU memory, speed and cost of each strategy, before any GPU time.

The model itself (what each byte is, the MFU calibration) is zerotune.core.memory; this module
lists the strategies, picks the fastest that fits and prints the table.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Optional

from zerotune.core.flops import num_params, shape
from zerotune.core.checkpoint_cost import WRITE_BYTES_PER_S, checkpoint_bytes, save_seconds
from zerotune.core.flops import PEAK_TFLOPS
from zerotune.core.io import GIB
from zerotune.core.long_context import sp_candidates
from zerotune.core.memory import (DEFAULT_CPU_MEMORY, DEFAULT_GPU_MEMORY,  # noqa: F401
                                  RESERVED, Estimate, Strategy, Workload, estimate_memory,  # noqa: F401
                                  workload_of)
from zerotune.core.speed import FUSED_LOSS_SPEED
from zerotune.core.recipe import Recipe, RecipeError
from zerotune.core.recipe_load import load_recipe, validate_recipe

from .data_size import cached_lengths, estimate_train_tokens, with_max_len
from .plan_layers import (ALL_LEVERS, Levers, estimate, fit_layers, fits_memory, longest_sequence,  # noqa: F401
                          planned_cpu_memory, sequence_problem)

MAX_AUTO_MICRO_BATCH = 64   # train.micro_batch_size: auto tries no larger micro-batch

HELP = "estimate memory, speed and cost of each strategy and recommend the fastest that fits"
DESCRIPTION = """\
Estimate per-GPU memory (parameters, gradients, optimizer states, activations, logits,
temporary buffers), CPU memory for offload, tokens/s, wall time, GPU-hours and cost for each
strategy (ZeRO-1/2/3, optimizer/parameter offload, LoRA, QLoRA, gradient checkpointing on/off)
and recommend the fastest that fits. `distributed.zero: auto` in a recipe uses this choice.
Micro-batches are planned for the data's longest row when its tokenized cache is there (`zerotune
data prepare RECIPE`, or an earlier train, writes it), else for data.max_len.

  zerotune plan recipes/demo.yaml --gpus 8 --nodes 2 --gpu-memory 80GB --price 2.5
"""


# --------------------------------------------------------------------------- strategies
def strategies(method: str) -> list[Strategy]:
    out = []
    for ckpt in (True, False):
        if method == "full":
            out += [Strategy("full", z, grad_ckpt=ckpt) for z in (0, 1, 2, 3)]
            out += [Strategy("full", 2, True, False, ckpt), Strategy("full", 3, True, False, ckpt),
                    Strategy("full", 3, True, True, ckpt)]
        elif method == "qlora":
            out.append(Strategy("qlora", 0, grad_ckpt=ckpt))
        else:
            out += [Strategy(method, 0, grad_ckpt=ckpt), Strategy(method, 3, grad_ckpt=ckpt)]
    return out


def alternatives(method: str) -> list[Strategy]:
    """PEFT rows shown next to a full fine-tune (they change the method, so auto never picks them)."""
    if method != "full":
        return []
    return [Strategy("lora", 0), Strategy("qlora", 0)]


def plan(w: Workload, method: str, gpu_memory: float = DEFAULT_GPU_MEMORY, cpu_memory: float = DEFAULT_CPU_MEMORY,
         price: Optional[float] = None, gpu_type: str = "h100", only: Optional[list[Strategy]] = None,
         levers: Levers = Levers()) -> list[Estimate]:
    """An estimate for every strategy of `method` (and the PEFT alternatives), or for `only`, with
    `levers` chosen per strategy (fit_layers)."""
    return [estimate(w, st, gpu_memory, cpu_memory, price, gpu_type, levers)
            for st in (only if only is not None else strategies(method) + alternatives(method))]


def recommend(rows: list[Estimate], method: str, grad_ckpt: Optional[bool] = None) -> Optional[Estimate]:
    """Fastest strategy of this method that fits; ties go to the one using less GPU memory."""
    ok = [r for r in rows if r.fits and r.strategy.method == method
          and (grad_ckpt is None or r.strategy.grad_ckpt == grad_ckpt)]
    return min(ok, key=lambda r: (-round(r.tokens_per_s, 6), r.total)) if ok else None


# --------------------------------------------------------------------------- from a recipe
def workload(recipe: Recipe, gpus_per_node: int, nodes: int) -> Workload:
    tokens, note = estimate_train_tokens(recipe, gpus_per_node * nodes)
    return workload_of(recipe, gpus_per_node, nodes, tokens, note)


def candidates(recipe: Recipe, w: Workload, gpu_memory: float, cpu_memory: float) -> list[Estimate]:
    """Every estimate `auto` may pick: the recipe's method; its offload flags stay on; a fixed
    ZeRO stage, checkpointing or loss stays as given; checkpointed layers, tiling and offloaded
    layers as fit_layers chooses them where auto. Rows with the chunked loss carry
    FUSED_LOSS_SPEED in their tokens/s (it is that much slower than the plain loss)."""
    d, t, method = recipe.distributed, recipe.train, recipe.method.kind
    fused_choices = [False, True] if t.fused_loss == "auto" else [bool(t.fused_loss)]
    if method not in ("full", "lora", "qlora"):
        fused_choices = [False]
    gcs = [True, False] if t.gradient_checkpointing == "auto" else [bool(t.gradient_checkpointing)]
    if d.zero == "auto":
        sts = [s for s in strategies(method) if s.grad_ckpt in gcs and (s.offload_optimizer or not d.offload_optimizer)
               and (s.offload_params or not d.offload_params)]
    else:
        sts = [Strategy(method, d.zero, d.offload_optimizer, d.offload_params, gc) for gc in gcs]
    rows = []
    for fused in fused_choices:
        for r in plan(replace(w, fused_loss=fused), method, gpu_memory, cpu_memory, only=sts, levers=Levers.of(t)):
            r.fused_loss = fused
            r.tokens_per_s *= FUSED_LOSS_SPEED if fused else 1.0
            rows.append(r)
    return rows


def choose(recipe: Recipe, gpus_per_node: int, nodes: int = 1, gpu_memory: float = DEFAULT_GPU_MEMORY,
           cpu_memory: float = DEFAULT_CPU_MEMORY) -> Estimate:
    """What `auto` runs (distributed.zero, train.gradient_checkpointing, train.fused_loss): the
    fastest fitting estimate among candidates(); .strategy and .fused_loss say what it is.
    One-line error when none fits."""
    w = workload(recipe, gpus_per_node, nodes)
    method = recipe.method.kind
    rows = candidates(recipe, w, gpu_memory, cpu_memory)
    if recipe.train.tiled_mlp == "auto" and recommend([r for r in rows if not r.tiled_mlp], method):
        rows = [r for r in rows if not r.tiled_mlp]   # the MLP tiled only when nothing fits untiled
    best = recommend(rows, method)
    if best is None and recipe.distributed.zero != "auto" and recipe.train.gradient_checkpointing != "auto":
        return min(rows, key=lambda r: r.total)   # only the loss / offload was left to choose: the smaller one
    if best is None:
        too_long = sequence_problem(recipe, w, gpu_memory, cpu_memory, strategies(recipe.method.kind))
        if too_long:
            raise RecipeError(too_long)
        smallest = min(rows, key=lambda r: r.total)
        keys = [k for k, v in (("distributed.zero", recipe.distributed.zero),
                               ("train.gradient_checkpointing", recipe.train.gradient_checkpointing)) if v == "auto"]
        other = recommend(plan(w, method, gpu_memory, cpu_memory, levers=ALL_LEVERS), method)   # the fixed keys let go
        hint = (" ".join(f"--set {o}" for o in other.overrides()) + " fits" if other else
                sp_hint(w, method, gpu_memory, cpu_memory) + "; or add GPUs, lower train.micro_batch_size or "
                "data.max_len, or use method.kind: lora / qlora")
        raise RecipeError(
            f"{' and '.join(keys)}: auto: no strategy fits {recipe.model.path} on {w.world} GPU(s) of "
            f"{gpu_memory / GIB:.1f} GiB: the smallest, {smallest.label}, {smallest.why_not}; {hint}")
    return best


def pick_micro_batch(recipe: Recipe, gpus_per_node: int, nodes: int = 1,
                     gpu_memory: float = DEFAULT_GPU_MEMORY, cpu_memory: float = DEFAULT_CPU_MEMORY) -> Recipe:
    """train.micro_batch_size: auto -> the micro-batch (a divisor of global_batch_size per replica,
    at most MAX_AUTO_MICRO_BATCH) whose fastest fitting strategy is fastest; ties go to the larger.
    Gradient accumulation fills the rest of global_batch_size. Nothing fits: 1 (choose says why)."""
    t = recipe.train
    if t.micro_batch_size != "auto":
        return recipe
    replicas = recipe.distributed.replicas(gpus_per_node * nodes)
    if t.global_batch_size % replicas:
        raise RecipeError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of the "
                          f"{replicas} data-parallel GPU(s) (needed by train.micro_batch_size: auto)")
    per_replica = t.global_batch_size // replicas
    data = recipe.model_dump(mode="json")
    best_key, best = None, None
    for mbs in [m for m in range(1, min(per_replica, MAX_AUTO_MICRO_BATCH) + 1) if per_replica % m == 0]:
        data["train"]["micro_batch_size"] = mbs
        candidate = validate_recipe(data, source="resolved recipe")
        try:
            e = choose(candidate, gpus_per_node, nodes, gpu_memory, cpu_memory)
        except RecipeError:
            continue
        if e.fits and (best_key is None or (round(e.tokens_per_s, 6), mbs) > best_key):
            best_key, best = (round(e.tokens_per_s, 6), mbs), candidate
    if best is None:
        data["train"]["micro_batch_size"] = 1
        return validate_recipe(data, source="resolved recipe")
    return best


def sp_hint(w: Workload, method: str, gpu_memory: float, cpu_memory: float, levers: Levers = Levers()) -> str:
    """What a sequence too long for the workload's settings needs: the smallest larger SP degree
    (dividing the GPUs of a node and the attention heads) with a strategy that fits, the planner
    free to choose what `levers` leave to it (`zerotune plan` at that degree then shows the same
    row), else the same with the checkpointed activations in CPU memory, or why none does."""
    for offload in sorted({w.offload_activations, True}):
        for n in sp_candidates(w):
            if n < w.sequence_parallel or (n == w.sequence_parallel and offload == w.offload_activations):
                continue
            best = recommend(plan(replace(w, sequence_parallel=n, offload_activations=offload), method,
                                  gpu_memory, cpu_memory, levers=levers), method)
            if best is None:
                continue
            sets = ([f"distributed.sequence_parallel={n}"] if n != w.sequence_parallel else []) + \
                (["train.offload_activations=true"] if offload and not w.offload_activations else [])
            return (f"with {' '.join('--set ' + x for x in sets)} (each GPU holds {w.seq_len // n:,} of the "
                    f"{w.seq_len:,} tokens) {best.label} fits at {best.total / GIB:.1f} GiB per GPU")
    return (f"no sequence-parallel degree up to the {w.gpus_per_node} GPUs of a node fits {w.seq_len:,} tokens, "
            "even with train.offload_activations: lower data.max_len, or add GPUs per node")


def check_fits(recipe: Recipe, gpus_per_node: int, nodes: int = 1, gpu_memory: float = DEFAULT_GPU_MEMORY,
               cpu_memory: float = DEFAULT_CPU_MEMORY) -> Estimate:
    """The estimate of the strategy the (resolved) recipe runs; a one-line error when it cannot fit."""
    w = workload(recipe, gpus_per_node, nodes)
    d = recipe.distributed
    st = Strategy(recipe.method.kind, recipe.zero_stage(), d.offload_optimizer, d.offload_params,
                  bool(recipe.train.gradient_checkpointing))
    e = estimate(w, st, gpu_memory, cpu_memory, levers=Levers.of(recipe.train))
    if not e.fits:
        too_long = sequence_problem(recipe, w, gpu_memory, cpu_memory, strategies(recipe.method.kind))
        if too_long:
            raise RecipeError(too_long)
        better = recommend(plan(w, recipe.method.kind, gpu_memory, cpu_memory, levers=ALL_LEVERS), recipe.method.kind)
        hint = ("; " + " ".join(f"--set {o}" for o in better.overrides()) + " fits") if better else ""
        if better is None:
            hint = "; " + sp_hint(w, recipe.method.kind, gpu_memory, cpu_memory)
        raise RecipeError(
            f"{e.label} needs about {e.total / GIB:.1f} GiB per GPU (usable: {(gpu_memory - RESERVED) / GIB:.1f} "
            f"GiB) and {e.cpu_per_node / GIB:.0f} GiB CPU memory per node: it will not fit{hint} "
            f"(see `zerotune plan`, or --gpu-memory if your GPUs are larger)")
    return e


# --------------------------------------------------------------------------- CLI
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
    return (f"checkpoint: ~{checkpoint_bytes(w, st) / GIB:,.1f} GiB a save, ~{seconds:,.0f} s to write at "
            f"{WRITE_BYTES_PER_S / GIB:.0f} GiB/s per node (assumed); a Slurm job gets its stop signal "
            f"{int(STOP_MARGIN_S + seconds)} s before its time limit (that + {STOP_MARGIN_S} s)")


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
    recipe = pick_micro_batch(lengths.planning_recipe(recipe) if lengths else recipe, gpus, nodes, gpu_memory, cpu_memory)
    data_lines = (lengths.lines(with_max_len(recipe, written.data.max_len)) if lengths else
                  [f"data: planned for micro-batches of {recipe.train.micro_batch_size} x data.max_len "
                   f"{written.data.max_len:,} tokens: {why}; plan then reads the data's real lengths, as train does"])
    w = workload(recipe, gpus, nodes)
    rows = plan(w, recipe.method.kind, gpu_memory, cpu_memory, args.price, args.gpu_type, levers=Levers.of(recipe.train))
    best = recommend(rows, recipe.method.kind)
    longest = {r.strategy: tuple(longest_sequence(w, r.strategy, gpu_memory, cpu_memory, host)[0]
                                 for host in (False, True)) for r in rows}
    if args.json:
        print(json.dumps({"workload": {k: v for k, v in asdict(w).items() if k != "model"}, "data": data_lines,
                          "recommended": best.strategy.label if best else None,
                          "rows": [{**asdict(r), "strategy": r.label, **asdict(r.strategy),
                                    "longest_seq_gpu": longest[r.strategy][0],
                                    "longest_seq_host": longest[r.strategy][1]} for r in rows]},
                         indent=1))
    else:
        print(f"GPU memory: {gpu.describe()}")
        print("\n".join(data_lines))
        print(format_table(rows, w, best, gpu_memory, longest))
        if best is None:
            print(f"long sequences: {sp_hint(w, recipe.method.kind, gpu_memory, cpu_memory, Levers.of(recipe.train))}")
        else:
            print(checkpoint_line(w, best.strategy))
    return 0 if best is not None else 1
