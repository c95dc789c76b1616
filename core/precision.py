"""train.precision: which runs put their decoder's linear layers in FP8 (torchao float8 training,
training/model/fp8.py), decided without torch so the launcher and every rank share one rule.

    value, why = choose("auto", method="lora", zero=0, capability=(9, 0), has_torchao=True,
                        dtype="bf16", hidden=4096, tokens=4096)
    # ("bf16", "fp8 not measured faster for lora at hidden 4096, 4096 tokens per micro-batch")
    # tokens=8192: ("fp8", "measured 1.11x for lora at hidden 4096, 8192 tokens (H100 2026-12-07 call H2 ...)")

bf16 is the matmuls in model.dtype (no FP8). fp8 needs a GPU with FP8 tensor cores (compute
capability 8.9+: Ada, Hopper, Blackwell), torchao, model.dtype bf16 (the master weights and
everything outside the FP8 GEMMs stay bf16), method full or lora, and ZeRO 0-2: ZeRO-3 is refused
(its layers are not compiled here, and torchao's casts uncompiled cost more than FP8 saves; its
parameter gathering with Float8Linear is unmeasured). A LoRA base keeps its weights cast to FP8
once (training/model/fp8_frozen.py: 1 byte a weight more, counted by core/memory.py; where the bf16
plan leaves no room for it, auto's fp8 is planned again at the same micro-batch with more layers
checkpointed, as MEASURED's rows were measured, and stays bf16 only where nothing fits:
launcher/prepare.py replan_fp8). QLoRA gets nothing: its NF4 base is
dequantised to bf16 for every matmul. `auto` picks fp8 only where MEASURED holds a row for the
method, GPU, hidden size and at most the run's tokens per micro-batch that was at least
MIN_SPEEDUP faster; everything else stays bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import RecipeError

FP8_CAPABILITY = (8, 9)        # FP8 tensor cores: sm_89 (Ada), sm_90 (Hopper), sm_100+ (Blackwell)
FP8_METHODS = ("full", "lora")
MIN_SPEEDUP = 1.05             # a measured gain below this is noise: bf16 stays


@dataclass(frozen=True)
class Measured:
    """One measured shape: the whole training step, bf16 time / fp8 time (benchmarks/bench.py
    `--variant fp8='train.precision=fp8'` against default, the recipe as written otherwise)."""
    method: str                   # full | lora
    capability: tuple[int, int]   # the GPU's compute capability (H100 and H200: (9, 0))
    hidden: int                   # model hidden_size
    tokens: int                   # tokens per micro-batch: micro_batch_size x max_len / sequence_parallel
    speedup: float                # bf16 step time / fp8 step time
    where: str                    # the call that measured it, e.g. "H200 2026-12-06 bench.py lora-8b"


# One row per measured shape; a measured row is one line.
MEASURED: tuple[Measured, ...] = (
    Measured("lora", (9, 0), 4096, 8192, 1.11, "H100 2026-12-07 call H2 bench.py lora-8b: 11,491 -> 12,756 tok/s"),
    Measured("lora", (9, 0), 4096, 32768, 1.13, "H100 2026-12-07 call H2 bench.py lora-8b-32k: 6,744 -> 7,643 tok/s"),
)


def measured(method: str, capability: tuple[int, int], hidden: int, tokens: int,
             table: Optional[tuple[Measured, ...]] = None) -> Optional[Measured]:
    """The row for this method, GPU and hidden size at the most tokens not above `tokens`: FP8's
    gain grows with the GEMM's rows, so a row measured at fewer tokens is a lower bound."""
    rows = [r for r in (MEASURED if table is None else table) if r.method == method
            and tuple(r.capability) == tuple(capability)
            and r.hidden == hidden and r.tokens <= tokens]
    return max(rows, key=lambda r: r.tokens, default=None)


def unsupported(method: str, zero: int, dtype: str, capability: Optional[tuple[int, int]],
                has_torchao: bool) -> Optional[str]:
    """Why FP8 cannot run here (None when it can), the machine first. capability None: no CUDA GPU."""
    if capability is None:
        return "no CUDA GPU here (FP8 needs compute capability 8.9+: Ada, Hopper, Blackwell)"
    if tuple(capability) < FP8_CAPABILITY:
        return f"GPU compute capability {capability[0]}.{capability[1]} has no FP8 tensor cores (8.9+ needed)"
    if method == "qlora":
        return "method.kind qlora: the NF4 base is dequantised to bf16 for its matmuls (nothing runs in FP8)"
    if method not in FP8_METHODS:
        return f"method.kind {method}: FP8 is for full and lora"
    if zero == 3:
        return "distributed.zero 3: FP8 runs at ZeRO 0-2 (ZeRO-3 layers are not compiled, and uncompiled FP8 casts cost more than they save)"
    if dtype != "bf16":
        return f"model.dtype {dtype}: FP8 training keeps bf16 master weights (set model.dtype: bf16)"
    if not has_torchao:
        return "torchao is not installed (pip install 'zerotune[gpu]')"
    return None


def choose(setting: str, *, method: str, zero: int, dtype: str, capability: Optional[tuple[int, int]],
           has_torchao: bool, hidden: Optional[int], tokens: int,
           table: Optional[tuple[Measured, ...]] = None) -> tuple[str, str]:
    """(bf16 | fp8, why) for train.precision `setting`; explicit fp8 that cannot run is a
    RecipeError naming the key."""
    if setting == "bf16":
        return "bf16", "as set"
    problem = unsupported(method, zero, dtype, capability, has_torchao)
    if setting == "fp8":
        if problem:
            raise RecipeError(f"train.precision: fp8 cannot run here: {problem}; use bf16 or auto")
        return "fp8", "as set"
    if problem:
        return "bf16", f"fp8 not possible: {problem}"
    row = measured(method, capability, hidden or 0, tokens, table)
    if row is None or row.speedup < MIN_SPEEDUP:
        return "bf16", f"fp8 not measured faster for {method} at hidden {hidden}, {tokens} tokens per micro-batch"
    return "fp8", f"measured {row.speedup:.2f}x for {method} at hidden {row.hidden}, {row.tokens} tokens ({row.where})"


def tokens_per_micro_batch(micro_batch_size: int, max_len: int, sequence_parallel: int = 1) -> int:
    """The rows of each linear layer's GEMM on one GPU (padded batches: the most it can be)."""
    return int(micro_batch_size) * -(-max_len // sequence_parallel)
