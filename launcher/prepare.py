"""Recipe -> RUN_DIR: validate everything that can be checked before any GPU time is spent
(launcher/preflight.py), then write RUN_DIR/recipe.yaml (resolved) and RUN_DIR/ds_config.json.

A run folder that already holds checkpoints keeps the recipe they were trained with: a new
recipe that differs in keys that change the training is refused (the changed keys are named)
unless checkpoint.allow_recipe_change is set; the keys of core.recipe.RESUME_SAFE_KEYS (the
run's length, eval, checkpoint.*, logging.*, cluster.*, ...) may change freely. Either way the
earlier recipe is kept as RUN_DIR/recipe.<step>.yaml (step: the newest complete checkpoint).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from zerotune.core.families import choose_attention, zero3_problem
from zerotune.core.io import atomic_write
from zerotune.core import quiet, runlock
from zerotune.core.layout import DS_CONFIG_FILE, LAUNCHER_LOG, LOGS_DIR, RECIPE_FILE, check_fresh_start, latest_complete, read_state, step_of
from zerotune.core.long_context import check_sequence_parallel, layer_options
from zerotune.core.recipe import RESUME_SAFE_KEYS, Recipe, RecipeError
from zerotune.core.memory import DEFAULT_GPU_MEMORY, Estimate
from zerotune.core.recipe_load import load_recipe, load_run_recipe, validate_recipe

from . import ds_config, preflight
from .data_size import DataLengths, as_written
from .gpus import GpuMemory, kernels_for, planned_gpu_memory
from zerotune.training.monitoring.tracker_setup import check_trackers

_NONE = object()


def resolve(recipe: Recipe, world_size: int, nodes: int = 1, gpu: Optional[GpuMemory] = None) -> Recipe:
    """Fill choices left to zerotune so RUN_DIR/recipe.yaml says what ran, planned for `gpu` (the
    memory of one GPU, launcher/gpus.py; default: 80 GiB assumed): plan_auto's micro-batch, kernels
    and choice for the `auto` keys, offload flags included; train.compile as compile_choice says.
    cluster.gpu_memory records the size planned for."""
    gpu = gpu or GpuMemory(DEFAULT_GPU_MEMORY, "assumed")
    per_node = max(1, world_size // max(1, nodes))
    recipe, best = plan_auto(recipe, per_node, nodes, gpu)
    data = recipe.model_dump(mode="json")
    if best is not None:
        st = best.strategy
        data["distributed"].update(zero=st.zero, offload_optimizer=st.offload_optimizer, offload_params=st.offload_params)
        data["train"].update(fused_loss=best.fused_loss, **best.settings())
    data["train"]["compile"] = compile_choice(validate_recipe(data, source="resolved recipe"), gpu)
    data["cluster"]["gpu_memory"] = gpu.recorded()
    return validate_recipe(data, source="resolved recipe")


def plan_auto(recipe: Recipe, per_node: int, nodes: int, gpu: GpuMemory,
              cpu_memory: Optional[float] = None) -> tuple[Recipe, Optional[Estimate]]:
    """What `zerotune train` plans (resolve) and `zerotune plan` says (its `auto:` line): model.kernels
    as launcher/gpus.py kernels_for says (before the plan: liger's savings are counted); then
    train.micro_batch_size: auto, the largest that fits (gradient accumulation keeps
    global_batch_size); then, when distributed.zero, train.gradient_checkpointing (the number of
    layers, core/memory.py), train.tiled_mlp, train.offload_activations (layers, against this
    machine's host memory for a run here, launcher/plan.py planned_cpu_memory),
    train.recompute_attention or train.fused_loss is auto, the planner's fastest choice that fits
    (launcher/plan.py choose). Returns (the recipe with kernels and micro-batch resolved, the choice
    or None when no key is auto). cpu_memory: a node's, as `zerotune plan --cpu-memory` gives it."""
    from .plan import choose, pick_micro_batch, planned_cpu_memory
    cpu = cpu_memory or planned_cpu_memory(recipe, local=gpu.where == "gpus")
    data = recipe.model_dump(mode="json")
    data["model"]["kernels"] = kernels_for(recipe, gpu)
    recipe = pick_micro_batch(validate_recipe(data, source="resolved recipe"), per_node, nodes, gpu.bytes, cpu)
    t = recipe.train
    if "auto" not in (recipe.distributed.zero, t.gradient_checkpointing, t.fused_loss, t.offload_activations, t.tiled_mlp,
                      t.recompute_attention):
        return recipe, None
    return recipe, choose(recipe, gpus_per_node=per_node, nodes=nodes, gpu_memory=gpu.bytes, cpu_memory=cpu)


def compile_choice(recipe: Recipe, gpu: GpuMemory) -> bool:
    """train.compile: auto -> on for full and LoRA at ZeRO 0-2 without liger's kernels or a long-sequence
    option reshaping the layer (training/model/build.py wants_compile, the same rule) when the run has CUDA
    GPUs: a Slurm job's, or the ones nvidia-smi sees here. The ranks follow the recorded value; where
    the ranks choose the kernels (a Slurm job's model.kernels: auto) they choose compile too."""
    c = recipe.train.compile
    if c != "auto":
        return c
    if recipe.model.kernels == "auto":   # a Slurm job's ranks choose the kernels, and compile with them (build.py)
        return "auto"
    return (gpu.where in ("gpus", "slurm") and recipe.zero_stage() < 3 and recipe.method.kind in ("full", "lora")
            and recipe.model.kernels != "liger" and not layer_options(recipe))   # liger's kernels are not compiled


def say_plan(recipe: Recipe, gpu: GpuMemory, precision_why: str = "") -> None:
    """The line that prints what was chosen, and for which GPU size."""
    t, d, m = recipe.train, recipe.distributed, recipe.model
    ranks = " (each rank decides)" if gpu.where == "slurm" else ""
    print(f"zerotune: planned for {gpu.describe()}: ZeRO-{d.zero}, micro_batch_size {t.micro_batch_size}, "
          f"attention {m.attn_implementation}{ranks if m.attn_implementation == 'auto' else ''}, "
          f"kernels {m.kernels}{ranks if m.kernels == 'auto' else ''}, "
          f"gradient_checkpointing {str(t.gradient_checkpointing).lower()}, fused_loss {str(t.fused_loss).lower()}, "
          f"tiled_mlp {str(t.tiled_mlp).lower()}, offload_activations {str(t.offload_activations).lower()}, "
          f"recompute_attention {str(t.recompute_attention).lower()}, "
          f"compile {str(t.compile).lower()}, "
          f"precision {matmul_precision(t.precision, m.dtype)}" + (f" ({precision_why})" if precision_why else ""),
          file=sys.stderr, flush=True)


def matmul_precision(precision: str, dtype: str) -> str:
    """What the matmuls run in: train.precision bf16 means "no fp8", so an fp32 or fp16 model's
    matmuls run in its model.dtype (the plan line says that, not bf16)."""
    return dtype if precision == "bf16" and dtype != "bf16" else precision


def resolve_precision(recipe: Recipe, gpu: GpuMemory, config: dict,
                      replan: Optional[Callable[[Recipe], Optional[Recipe]]] = None) -> tuple[Recipe, str]:
    """train.precision (core/precision.py) after the plan: (the recipe, why). Local GPUs: auto
    becomes bf16 or fp8 for their compute capability (nvidia-smi, launcher/gpus.py); explicit fp8 that cannot run is
    one line here, before torchrun. A Slurm job's auto stays auto (its ranks decide,
    training/model/fp8.py); its explicit fp8 is checked for all but the GPU, which the ranks check.
    replan: the plan again for auto's fp8 (a LoRA base keeps an FP8 copy of its weights, core/memory.py:
    more layers checkpointed where memory needs them), None where nothing fits; auto stays bf16 then."""
    import importlib.util
    from zerotune.core import precision
    t = recipe.train
    slurm = gpu.where == "slurm"
    if t.precision == "bf16" or (slurm and t.precision == "auto"):
        return recipe, "decided on each rank" if t.precision == "auto" else ""
    cap = precision.FP8_CAPABILITY if slurm else gpu.capability
    value, why = precision.choose(
        t.precision, method=recipe.method.kind, zero=recipe.zero_stage(), dtype=recipe.model.dtype, capability=cap,
        has_torchao=importlib.util.find_spec("torchao") is not None, hidden=config.get("hidden_size"),
        tokens=precision.tokens_per_micro_batch(t.micro_batch_size, recipe.data.max_len,
                                                recipe.distributed.sequence_parallel))
    chosen = recipe.model_copy(update={"train": t.model_copy(update={"precision": value})})
    if value == "fp8" and t.precision == "auto" and replan is not None:
        again = replan(chosen)
        if again is None:
            return recipe.model_copy(update={"train": t.model_copy(update={"precision": "bf16"})}), \
                f"{why}, but the plan does not fit with the FP8 copy of the frozen weights"
        return again, why
    return chosen, why


def replan_fp8(planning: Recipe, chosen: Recipe, world_size: int, nodes: int, gpu: GpuMemory) -> Optional[Recipe]:
    """`chosen` (the plan, with auto's fp8) if it fits the GPU planned for; else the plan again from
    `planning` (the recipe before the plan) with fp8 and chosen's micro-batch (the size fp8 was
    measured at), which counts a LoRA base's FP8 copy; None where that does not fit either."""
    def fits(r: Recipe) -> bool:
        if not gpu.known:
            return True
        from .plan import check_fits
        try:
            check_fits(r, max(1, world_size // nodes), nodes, gpu.bytes)
        except RecipeError:
            return False
        return True
    if fits(chosen):
        return chosen
    t = planning.train.model_copy(update={"precision": "fp8", "micro_batch_size": chosen.train.micro_batch_size})
    try:
        again = resolve(planning.model_copy(update={"train": t}), world_size, nodes, gpu)
    except RecipeError:
        return None
    return again if fits(again) else None


def resolve_attention(recipe: Recipe, config: dict, gpu: GpuMemory) -> Recipe:
    """model.attn_implementation: an explicit kernel checked against the model family
    (core/families.py); auto -> the fastest kernel the family supports on this machine's GPUs
    (`gpu`: launcher/gpus.py), except for a Slurm job: there auto stays auto and each rank decides
    on its own GPU, as for model.kernels (training/model/build.py: attention; rank 0 prints it)."""
    m = recipe.model
    chosen = choose_attention(config, m.attn_implementation, gpu.where == "gpus")
    if gpu.where == "slurm" and m.attn_implementation == "auto":
        return recipe
    if chosen == m.attn_implementation:
        return recipe
    return recipe.model_copy(update={"model": m.model_copy(update={"attn_implementation": chosen})})


# ----------------------------------------------------------------------------- a changed recipe
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'l': [{'x': 2}]} -> {'a.b': 1, 'l.0.x': 2}; lists of plain values stay whole."""
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def recipe_changes(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key that differs. An `auto` in the old recipe
    matches what it resolves to now: RUN_DIR/recipe.yaml holds auto only for keys the zerotune
    that wrote it did not resolve (or did not have: their default is auto)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    keys = dict.fromkeys([*a, *b])
    return [(k, a.get(k, _NONE), b.get(k, _NONE)) for k in keys
            if a.get(k, _NONE) != b.get(k, _NONE) and a.get(k) != "auto"]


def is_resume_safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in RESUME_SAFE_KEYS)


def _show(value: Any) -> str:
    text = "(unset)" if value is _NONE else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changes)


def _archive_path(run_dir: Path, step: int) -> Path:
    path, k = run_dir / f"recipe.{step:06d}.yaml", 2
    while path.exists():
        path, k = run_dir / f"recipe.{step:06d}-{k}.yaml", k + 1
    return path


def check_recipe_change(recipe: Recipe) -> Optional[tuple[Path, str]]:
    """When RUN_DIR holds checkpoints and RUN_DIR/recipe.yaml differs from `recipe`: refuse
    (one line, the changed keys) unless the change is allowed; else return (where to keep the
    earlier recipe, what changed). None when there is nothing to keep."""
    run_dir, newest = recipe.run_dir, latest_complete(recipe.run_dir)
    old_file = run_dir / RECIPE_FILE
    if newest is None:
        return None
    allowed = recipe.checkpoint.allow_recipe_change or recipe.checkpoint.resume == "never"
    hint = (f"set checkpoint.allow_recipe_change: true to resume with the new one (the earlier one is kept as "
            f"{_archive_path(run_dir, step_of(newest)).name}), or give the run another name")
    if not old_file.is_file():   # a recipe.yaml lost since: the checkpoint's digest tells whether it matches
        saved = read_state(newest).get("recipe_digest")
        if saved and saved != recipe.digest() and not allowed:
            raise RecipeError(f"checkpoint.allow_recipe_change: {newest} was trained with another recipe (digest "
                              f"{saved}, {old_file} is missing); {hint}")
        return None
    try:
        old = load_run_recipe(run_dir)
    except RecipeError as e:
        if not allowed:
            raise RecipeError(f"checkpoint.allow_recipe_change: {old_file} (the recipe of {newest.name}) cannot be "
                              f"read to compare ({str(e).splitlines()[0]}); {hint}") from None
        return _archive_path(run_dir, step_of(newest)), "unreadable before"
    changes = recipe_changes(old, recipe)
    if not changes:
        return None
    training = [c for c in changes if not is_resume_safe(c[0])]
    if training and not allowed:
        raise RecipeError(f"checkpoint.allow_recipe_change: {run_dir} holds checkpoints (newest {newest.name}) "
                          f"trained with another recipe: {describe(training)}; {hint}")
    return _archive_path(run_dir, step_of(newest)), describe(changes)


# ----------------------------------------------------------------------------- the whole preparation
def prepare_run(recipe_path: str, overrides: list[str], world_size: int, nodes: int = 1,
                gpu_flag: Optional[str] = None, slurm: bool = False, fit_check: Optional[bool] = None,
                lock: bool = False) -> Recipe:
    """Everything before torchrun / sbatch, then RUN_DIR written. Every `auto` is planned for the
    GPU memory of launcher/gpus.py (gpu_flag: --gpu-memory; slurm: the job's GPUs,
    cluster.gpu_memory) and for the data's real lengths (the tokenized cache, written first and
    kept for a retry: launcher/data_size.py); the fit check (default: whenever that memory is
    known, not assumed) refuses, in one line naming the --set that fits, a recipe that cannot fit it. `lock`
    (`zerotune train`, `zerotune launch` on node 0): refuse a run folder another job holds before
    any work, and take RUN_DIR/LOCK (core/runlock.py) before writing it, held until this process
    ends or releases it."""
    recipe = load_recipe(recipe_path, overrides)                       # the recipe; local paths made absolute
    if recipe.logging.verbose:
        quiet.show_all()                                               # other packages' lines on the console too
    if lock:
        runlock.check(recipe.run_dir)                                  # one job per run folder: refused before any work
    try:
        return _prepare(recipe, recipe_path, world_size, nodes, planned_gpu_memory(recipe, gpu_flag, slurm),
                        fit_check, lock)
    except BaseException:
        runlock.release(recipe.run_dir)
        raise


def _prepare(recipe: Recipe, recipe_path: str, world_size: int, nodes: int, gpu: GpuMemory,
             fit_check: Optional[bool], lock: bool) -> Recipe:
    check_trackers(recipe)                                             # wandb / mlflow installed if asked for
    config, tokenizer = preflight.check_inputs(recipe, Path(recipe_path).parent)  # model, tokenizer, vocabulary, data
    recipe = resolve_attention(recipe, config, gpu)                    # auto -> the family's kernel; or its error
    problem = check_sequence_parallel(recipe, gpus_per_node=world_size // nodes, nodes=nodes, model_config=config)
    if problem:                                                        # SP degree vs GPUs, heads, method, kernel
        raise RecipeError(problem)
    kernels_for(recipe, gpu)                                           # model.kernels' one line, before tokenizing
    resolve_precision(recipe, gpu, config)                             # an explicit fp8 that cannot run: likewise
    run_dir = recipe.run_dir
    check_fresh_start(run_dir, recipe.checkpoint.resume, recipe.checkpoint.overwrite)
    preflight.check_resume(recipe)
    lengths = DataLengths.of(preflight.prepare_data(recipe, tokenizer), recipe)   # the cache the ranks load
    planning = lengths.planning_recipe(recipe)                         # x the longest row, not max_len
    planned = resolve(planning, world_size, nodes, gpu)
    planned, precision_why = resolve_precision(                        # train.precision: bf16 / fp8 (or its one-line refusal)
        planned, gpu, config, replan=lambda r: replan_fp8(planning, r, world_size, nodes, gpu))
    if planned.zero_stage() == 3 and zero3_problem(config):            # a mixture of experts without a known block
        raise RecipeError(zero3_problem(config))
    if gpu.known if fit_check is None else fit_check:   # before anything is written or torchrun starts
        from .plan import check_fits
        check_fits(planned, max(1, world_size // nodes), nodes, gpu.bytes)
    recipe = as_written(planned, recipe)
    keep = check_recipe_change(recipe)
    preflight.check_disk(recipe, config)
    cfg = ds_config.render(recipe, world_size)
    say_plan(recipe, gpu, precision_why)                       # every check passed: what was chosen, for which GPU
    for line in lengths.lines(recipe):
        print(f"zerotune: {line}", file=sys.stderr, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)   # nothing is written before every check passed
    quiet.attach(run_dir / LOGS_DIR / LAUNCHER_LOG)
    if lock:
        runlock.acquire(run_dir)
    if keep is not None:
        archive, what = keep
        atomic_write(archive, (run_dir / RECIPE_FILE).read_text())
        print(f"zerotune: the recipe changed since {latest_complete(run_dir).name} ({what}); the earlier one is "
              f"kept as {archive}", file=sys.stderr, flush=True)
    atomic_write(run_dir / RECIPE_FILE, recipe.to_yaml())
    atomic_write(run_dir / DS_CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
    return recipe
