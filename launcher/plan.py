"""The planner: every strategy's per-GPU memory, speed and cost for a recipe, the fastest that fits,
what `auto` resolves to (choose), the largest micro-batch that fits, and the one-line refusals.

The model itself (what each byte is) is zerotune.core.memory, the MFUs zerotune.core.speed; the
`zerotune plan` command that prints the table is launcher/plan_cli.py.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from zerotune.core.io import GIB
from zerotune.core.long_context import sp_candidates
from zerotune.core.memory import (DEFAULT_CPU_MEMORY, DEFAULT_GPU_MEMORY,  # noqa: F401
                                  RESERVED, Estimate, Strategy, Workload, estimate_memory,  # noqa: F401
                                  workload_of)
from zerotune.core.speed import FUSED_LOSS_SPEED
from zerotune.core.recipe import Recipe, RecipeError
from zerotune.core.recipe_load import validate_recipe

from .data_size import estimate_train_tokens
from .plan_layers import (ALL_LEVERS, Levers, estimate, fit_layers, fits_memory, longest_sequence,  # noqa: F401
                          planned_cpu_memory, sequence_problem)

MAX_AUTO_MICRO_BATCH = 64   # train.micro_batch_size: auto tries no larger micro-batch


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
        for r in plan(replace(w, fused_loss=fused), method, gpu_memory, cpu_memory, only=sts,
                      levers=replace(Levers.of(t), keep_attention=kept_attention_lever(recipe))):
            r.fused_loss = fused
            r.tokens_per_s *= FUSED_LOSS_SPEED if fused else 1.0
            rows.append(r)
    return rows


def kept_attention_lever(recipe: Recipe) -> bool:
    """Whether train.recompute_attention: auto is the planner's to choose (launcher/plan_layers.py
    estimate: kept where the speed model says it pays): only where it was measured, LoRA without
    sequence parallelism, and where no layer would lose torch.compile for it (a layer that keeps
    attention is not compiled: prepare.py compile_choice), that is with liger's kernels or compile off.
    Elsewhere auto recomputes."""
    t = recipe.train
    return (t.recompute_attention == "auto" and recipe.method.kind == "lora" and recipe.distributed.sequence_parallel == 1
            and (t.compile is False or recipe.model.kernels == "liger"))


def choose(recipe: Recipe, gpus_per_node: int, nodes: int = 1, gpu_memory: float = DEFAULT_GPU_MEMORY,
           cpu_memory: float = DEFAULT_CPU_MEMORY) -> Estimate:
    """What `auto` runs (distributed.zero, train.gradient_checkpointing, train.fused_loss,
    train.recompute_attention): the
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
