"""The planner's choices by the decoder layer (core/memory.py's docstring): for one strategy, how many
layers to checkpoint, whether to tile the MLP, how many checkpointed inputs to offload to CPU memory
(fit_layers), the estimate that results (estimate), the longest sequence that fits (longest_sequence)
and the one-line refusal of a longer one (sequence_problem). launcher/plan.py lists the strategies.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from zerotune.core.flops import PEAK_TFLOPS, attention_forward_share, flops_per_token, shape
from zerotune.core.io import GIB, parse_size
from zerotune.core.layers import host_memory, layer_efficiency
from zerotune.core.long_context import gpu_memory_of
from zerotune.core.memory import DEFAULT_CPU_MEMORY, RESERVED, Estimate, Strategy, Workload
from zerotune.core.recipe import Recipe


@dataclass(frozen=True)
class Levers:
    """What the planner chooses per strategy, the recipe's `auto`s (core/memory.py's docstring): how
    many layers to checkpoint (train.gradient_checkpointing: the fewest that fit), whether to tile
    the MLP (train.tiled_mlp: only when nothing fits untiled), how many checkpointed layers to
    offload to CPU memory (train.offload_activations: only when nothing fits on the GPU, the fewest),
    whether checkpointed layers keep attention's output (train.recompute_attention: where the speed
    model says it pays, set by plan.py kept_attention_lever)."""
    ckpt_layers: bool = False
    tiling: bool = False
    offload: bool = False
    keep_attention: bool = False

    @staticmethod
    def of(train) -> "Levers":
        return Levers(train.gradient_checkpointing == "auto", train.tiled_mlp == "auto",
                      train.offload_activations == "auto")


ALL_LEVERS = Levers(True, True, True)


def fits_memory(m: dict, gpu_memory: float, cpu_memory: float) -> bool:
    return m["total"] <= gpu_memory - RESERVED and m["cpu_per_node"] <= cpu_memory * 0.9


def _fewest(lo: int, hi: int, ok) -> Optional[int]:
    """The smallest n in lo..hi with ok(n), for ok false then true as n grows; None if ok(hi) is false."""
    if lo > hi or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def fit_layers(w: Workload, st: Strategy, levers: Levers, gpu_memory: float, cpu_memory: float) -> Workload:
    """The workload with the levers set for `st`: untiled before tiled, and for each the fewest
    checkpointed layers that fit; then (nothing fitting on the GPU) every layer checkpointed and the
    fewest of their inputs in CPU memory. Nothing fits: the smallest of these, for the row to say so."""
    if levers == Levers():
        return w
    layers = shape(w.model)["layers"]

    def ok(w_: Workload, cpu: bool = True) -> bool:
        return fits_memory(gpu_memory_of(w_, st), gpu_memory, cpu_memory if cpu else float("inf"))
    w_ = w
    for tiled in ([False, True] if levers.tiling else [w.tiled_mlp]):
        w_ = replace(w, tiled_mlp=tiled, offload_activations=False if levers.offload else w.offload_activations)
        if st.grad_ckpt and levers.ckpt_layers:
            k = _fewest(1, layers, lambda k: ok(replace(w_, ckpt_layers=k)))
            if k is not None:
                return replace(w_, ckpt_layers=k)
            w_ = replace(w_, ckpt_layers=layers)
        elif ok(w_):
            return w_
    if st.grad_ckpt and levers.offload:
        k = shape(w.model)["layers"] if w_.ckpt_layers is None else min(w_.ckpt_layers, layers)
        o = _fewest(1, k, lambda o: ok(replace(w_, offload_activations=o), cpu=False))
        w_ = replace(w_, offload_activations=o if o is not None else k)
    return w_


def estimate(w: Workload, st: Strategy, gpu_memory: float, cpu_memory: float, price: Optional[float] = None,
             gpu_type: str = "h100", levers: Levers = Levers()) -> Estimate:
    """The estimate of `st` with the levers chosen (fit_layers). The keep_attention lever (ZeRO 0-2,
    checkpointing on): the faster of the layers fitted with attention recomputed and with it kept,
    kept only as measured (no input offloaded, the MLP untiled: benchmarks/results/raw/2026-12-06-h100-callC/);
    recomputed on a tie or when keeping it does not fit."""
    if levers.keep_attention and st.grad_ckpt and st.zero < 3:
        plain, kept = (_estimate(replace(w, keep_attention=k), st, gpu_memory, cpu_memory, price, gpu_type, levers)
                       for k in (False, True))
        measured = kept.ckpt_layers and not kept.offload_layers and not kept.tiled_mlp
        return kept if kept.fits and measured and kept.tokens_per_s > plain.tokens_per_s else plain
    return _estimate(w, st, gpu_memory, cpu_memory, price, gpu_type, levers)


def _estimate(w: Workload, st: Strategy, gpu_memory: float, cpu_memory: float, price: Optional[float],
              gpu_type: str, levers: Levers) -> Estimate:
    w = fit_layers(w, st, levers, gpu_memory, cpu_memory)
    m = gpu_memory_of(w, st)
    layers = shape(w.model)["layers"]
    kept = attention_forward_share(w.model, w.seq_len, frozen_base=st.method != "full") if w.keep_attention else 0.0
    mfu, source = layer_efficiency(st, w.world, layers, m["ckpt_layers"], m["offload_layers"], w.tiled_mlp, kept)
    tps = mfu * PEAK_TFLOPS[gpu_type] * 1e12 / flops_per_token(w.model, w.seq_len)
    why = []
    if m["total"] > gpu_memory - RESERVED:
        why.append(f"needs {m['total'] / GIB:.1f} GiB per GPU, {(gpu_memory - RESERVED) / GIB:.1f} usable")
    if m["cpu_per_node"] > cpu_memory * 0.9:
        why.append(f"needs {m['cpu_per_node'] / GIB:.0f} GiB CPU memory per node")
    e = Estimate(st, m["params"], m["grads"], m["optimizer"], m["activations"], m["logits"], m["temporary"],
                 m["total"], m["cpu_per_node"], not why, tps, mfu, source, why_not="; ".join(why),
                 offload_activations=m["offload_layers"] > 0, layers=layers, ckpt_layers=m["ckpt_layers"],
                 offload_layers=m["offload_layers"], tiled_mlp=w.tiled_mlp, kept_attention=w.keep_attention)
    if w.train_tokens:
        e.hours = w.train_tokens / (tps * w.world) / 3600
        e.gpu_hours = e.hours * w.world
        e.cost = e.gpu_hours * price if price is not None else None
    return e


def longest_sequence(w: Workload, st: Strategy, gpu_memory: float, cpu_memory: float, host: bool,
                     step: int = 1024, cap: int = 1 << 24) -> tuple[int, Optional[Estimate]]:
    """The longest data.max_len (a multiple of `step`) one sample of `st` fits at, the planner free to
    checkpoint, tile and (`host`) offload to CPU memory; and its estimate. (0, None): not even `step`."""
    levers = replace(ALL_LEVERS, offload=host)
    w1 = replace(w, micro_batch_size=1, offload_activations=False)

    def at(n: int) -> Estimate:
        return estimate(replace(w1, seq_len=n), st, gpu_memory, cpu_memory, levers=levers)
    n = _fewest(1, cap // step, lambda i: not at(i * step).fits)
    best = cap // step if n is None else n - 1
    return (best * step, at(best * step)) if best else (0, None)


def sequence_problem(recipe: Recipe, w: Workload, gpu_memory: float, cpu_memory: float,
                     sts: list[Strategy]) -> Optional[str]:
    """One line when data.max_len is longer than any strategy of the recipe's method fits (one sample
    a micro-batch, checkpointing, tiling and host offload free: longest_sequence; `sts`: the strategies): the longest that
    fits and the --set that gets there. None when the length is not the problem."""
    best_n, best = 0, None
    for st in sts:
        n, e = longest_sequence(w, st, gpu_memory, cpu_memory, host=True)
        if n > best_n:
            best_n, best = n, e
    if best_n >= w.seq_len:
        return None
    where = (f"{w.world} GPU(s) of {gpu_memory / GIB:.1f} GiB with {cpu_memory / GIB:.0f} GiB host memory per node"
             + (f", sequence parallel {w.sequence_parallel}" if w.sequence_parallel > 1 else ""))
    if best is None:
        return f"data.max_len: {w.seq_len:,} tokens: not even 1,024 tokens of {recipe.model.path} fit {where}"
    d, t = recipe.distributed, recipe.train
    given = {"distributed.zero": d.zero, "distributed.offload_optimizer": d.offload_optimizer,
             "distributed.offload_params": d.offload_params, "train.gradient_checkpointing": t.gradient_checkpointing,
             "train.offload_activations": t.offload_activations, "train.tiled_mlp": t.tiled_mlp,
             "train.micro_batch_size": t.micro_batch_size}
    sets = [f"data.max_len={best_n}"] + [
        o for o in best.overrides() + ["train.micro_batch_size=1"]
        if given.get(o.split("=")[0], "auto") != "auto" and str(given[o.split("=")[0]]).lower() != o.split("=")[1]]
    return (f"data.max_len: {w.seq_len:,} tokens do not fit {where}: the longest that fits is {best_n:,} tokens "
            f"({best.label}, {best.total / GIB:.1f} GiB per GPU, {best.cpu_per_node / GIB:.0f} GiB host): "
            + " ".join(f"--set {x}" for x in sets))


def planned_cpu_memory(recipe: Recipe, flag: Optional[str] = None, local: bool = True) -> float:
    """CPU memory of a node the plan counts offloaded states against: --cpu-memory, else cluster.mem,
    else this machine's (/proc/meminfo) for a run on it (`local`), else DEFAULT_CPU_MEMORY."""
    text = flag or (recipe.cluster.mem if recipe.cluster.mem not in (None, "0") else None)
    if text:
        return parse_size(text)
    return (host_memory() if local else None) or DEFAULT_CPU_MEMORY
