"""`zerotune plan RECIPE`: per-GPU memory, speed and cost of each strategy, before any GPU time.

The memory model (bytes, per GPU; N parameters, W GPUs, B x S tokens per micro-batch):

  parameters   2N (bf16/fp16) or 4N (fp32); ZeRO-3 shards them (/W); offload_params: on CPU
  gradients    2N or 4N; ZeRO-2/3 shard them (/W); with offload_optimizer they go to CPU
  optimizer    AdamW in mixed precision: fp32 master + m + v = 12N (ZeRO paper's K=12); 8N in
               fp32; 8-bit AdamW: master + 2 bytes. ZeRO-1/2/3 shard them (/W); offload: on CPU
  activations  with gradient checkpointing: each layer's input (B S d) is kept, plus one layer's
               working set while it is recomputed; without: every layer's working set.
               Working set of a Llama-style layer, per token: (11 d + 4 ff + 2 kv) x act bytes
               (norm inputs in fp32, q, rotated q/k, repeated k/v, attention out, gate, up,
               silu(gate), gate*up); LoRA adds, for every adapted linear, its dropout output
               (saved by lora_A, in the adapter's dtype) and the 1-byte dropout mask.
  logits       B S V x 12 bytes at the loss backward: fp32 log-probs saved by log_softmax, the
               gradient coming in and the gradient going out (all fp32).
  temporary    ZeRO communication buckets (reduce d^2, prefetch 0.9 d^2 elements) and, under
               ZeRO-3, the gathered LM-head/embedding weight and its gradient.

  total = parameters + gradients + optimizer + temporary + kept activations
          + max(logits, one layer's working set)   (the loss and a layer's recomputation
                                                     never hold memory at the same time)

LoRA / QLoRA on zerotune's path (training/model.py + training/engine.py, bf16 recipe). peft
creates the adapters in fp32, and for QLoRA peft's prepare_model_for_kbit_training upcasts every
non-quantised parameter (embeddings, LM head, norms) to fp32; then deepspeed.initialize with
bf16 enabled casts every floating-point parameter back to bf16 (engine._cast_module_mixed_
precision; the packed 4-bit weights are uint8 and stay) and wraps the optimizer in its
mixed-precision optimizer, which keeps an fp32 master copy of the trainable parameters. So:
  parameters   frozen base: bf16 (LoRA); QLoRA: every linear of the decoder layers in 4 bits
               plus its quantisation constants (NF4 blocks of 64 weights: one absmax each, with
               double quantisation an 8-bit absmax plus one fp32 scale per 256 blocks: 4.127
               bits a weight; without it an fp32 absmax: 4.5 bits; 8-bit: an fp32 scale per
               output row), embeddings, LM head and norms in bf16 (bitsandbytes never quantises
               them); plus the trainable adapters in bf16
  gradients    the adapters' bf16 gradients
  optimizer    fp32 master of the adapters (4 bytes) + AdamW m, v (8 bytes) or 8-bit m, v
               (2 bytes; paged AdamW 8-bit puts those of tensors of 100k+ elements in CUDA
               unified memory, which torch.cuda.max_memory_allocated does not see: < 0.08 GiB
               for an 8B model; counted here, as nvidia-smi sees them)
  activations  bf16 like the full fine-tune: with bf16 norm weights the residual stream is bf16;
               QLoRA adds the one 4-bit weight bitsandbytes dequantises to bf16 for each matmul
               (the largest linear, forward and backward), to the recomputed layer's working set.
The HF Trainer peer (../shared/bench/peer_hf.py, Workload(trainer="hf-trainer")) has no DeepSpeed
cast: its adapters stay fp32 (4 + 4 bytes parameters and gradients, no master copy), and for QLoRA
the non-quantised parameters stay fp32 (4 bytes) and their fp32 norm weights make the residual
stream, and so the kept and recomputed activations, fp32.

Speed: tokens/s per GPU = MFU x peak FLOP/s / training FLOPs per token (training/flops.py).
The MFUs are the initial calibration: the HF Trainer peer measured on one H100 80GB
(../shared/bench/README.md, 2026-11-24); values marked "assumed" in EFFICIENCY were not
measured. docs/plan_vs_measured.md compares estimates with measurements.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from training.config import Recipe, RecipeError, load_recipe
from training.flops import flops_per_token, linear_shapes, num_params, shape

HELP = "estimate memory, speed and cost of each strategy and recommend the fastest that fits"
DESCRIPTION = """\
Estimate per-GPU memory (parameters, gradients, optimizer states, activations, logits,
temporary buffers), CPU memory for offload, tokens/s, wall time, GPU-hours and cost for each
strategy (ZeRO-1/2/3, optimizer/parameter offload, LoRA, QLoRA, gradient checkpointing on/off)
and recommend the fastest that fits. `distributed.zero: auto` in a recipe uses this choice.

  zerotune plan recipes/demo.yaml --gpus 8 --nodes 2 --gpu-memory 80GB --price 2.5
"""

GIB = 2 ** 30
DEFAULT_GPU_MEMORY = 80 * GIB      # an 80 GB A100/H100 (nvidia-smi's 80 GB are GiB)
DEFAULT_CPU_MEMORY = 512 * GIB     # per node
RESERVED = 2.5 * GIB               # CUDA context, NCCL buffers, allocator fragmentation
LOGIT_BYTES = 12                   # per logit element, see the module docstring
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "a10g": 125.0}

# MFU per strategy, with gradient checkpointing, on one H100 (peer measurements unless "assumed").
EFFICIENCY = {
    ("full", 3, False, False): (0.221, "measured: peer, 1B ZeRO-3 mbs 8 seq 2048"),
    ("full", 3, True, True): (0.118, "measured: peer, 1B ZeRO-3 + offload optimizer and params"),
    ("full", 3, True, False): (0.16, "assumed: between ZeRO-3 and ZeRO-3 + offload all"),
    ("full", 2, True, False): (0.16, "assumed: as ZeRO-3 + offload optimizer"),
    ("full", 1, True, False): (0.16, "assumed: as ZeRO-3 + offload optimizer"),
    ("full", 2, False, False): (0.221, "assumed: as ZeRO-3 on one GPU"),
    ("full", 1, False, False): (0.221, "assumed: as ZeRO-3 on one GPU"),
    ("lora", 0, False, False): (0.297, "measured: peer, LoRA r16 8B mbs 4"),
    ("lora", 3, False, False): (0.22, "assumed: LoRA with the frozen base gathered per layer"),
    ("qlora", 0, False, False): (0.237, "measured: peer, QLoRA r16 8B NF4 mbs 4"),
}
ZERO3_MULTI_GPU = 0.9   # assumed: ZeRO-3 moves 1.5x the bytes of ZeRO-1/2 (ZeRO paper, sec. 7)
NO_CHECKPOINTING = 4 / 3  # recomputation costs one more forward: 8N instead of 6N FLOPs per token


@dataclass(frozen=True)
class Strategy:
    method: str                 # full | lora | qlora | other PEFT kinds
    zero: int
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_ckpt: bool = True

    @property
    def label(self) -> str:
        m = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}.get(self.method, self.method)
        off = " +offload opt+params" if self.offload_params else (" +offload opt" if self.offload_optimizer else "")
        return f"{m} ZeRO-{self.zero}{off}, ckpt {'on' if self.grad_ckpt else 'off'}"

    def overrides(self) -> list[str]:
        return [f"distributed.zero={self.zero}", f"distributed.offload_optimizer={str(self.offload_optimizer).lower()}",
                f"distributed.offload_params={str(self.offload_params).lower()}",
                f"train.gradient_checkpointing={str(self.grad_ckpt).lower()}"]


@dataclass
class Estimate:
    strategy: Strategy
    params: float
    grads: float
    optimizer: float
    activations: float          # kept (checkpoints) + one layer's working set
    logits: float
    temporary: float
    total: float                # per GPU, bytes
    cpu_per_node: float         # offloaded states, bytes
    fits: bool
    tokens_per_s: float         # per GPU
    mfu: float
    mfu_source: str
    hours: Optional[float] = None
    gpu_hours: Optional[float] = None
    cost: Optional[float] = None
    why_not: str = ""


@dataclass
class Workload:
    """What the estimate needs to know about a run."""
    model: dict                  # Hugging Face config.json
    dtype: str = "bf16"
    micro_batch: int = 1
    seq_len: int = 2048
    gpus_per_node: int = 1
    nodes: int = 1
    optimizer: str = "adamw"
    lora_r: int = 16
    lora_targets: object = "all-linear"
    lora_dropout: float = 0.05
    quant_bits: int = 4
    double_quant: bool = True
    train_tokens: Optional[float] = None   # tokens the run processes (None: unknown)
    data_note: str = ""
    trainer: str = "zerotune"    # whose training path: "zerotune" or "hf-trainer" (the peer; module docstring)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


# --------------------------------------------------------------------------- memory
def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def lora_params(w: Workload) -> int:
    """LoRA parameters: r x (in + out) for every adapted linear of every layer."""
    s = shape(w.model)
    shapes = linear_shapes(w.model)
    if w.lora_targets != "all-linear":  # Llama names, in linear_shapes order
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        shapes = [io for n, io in zip(names, shapes) if n in w.lora_targets]
    return s["layers"] * sum(w.lora_r * (i + o) for i, o in shapes)


def adapter_bytes(w: Workload) -> int:
    """Bytes of one adapter parameter: bf16 after DeepSpeed's cast (zerotune), fp32 for the peer."""
    return 4 if w.trainer == "hf-trainer" else dtype_bytes(w.dtype)


def quantised_bytes(w: Workload) -> float:
    """Bytes of the decoder layers' linear weights quantised by bitsandbytes, constants included."""
    s = shape(w.model)
    total = 0.0
    for i, o in linear_shapes(w.model):
        if w.quant_bits == 8:   # LLM.int8: int8 weights + one fp32 scale per output row
            total += i * o + 4 * o
        else:                   # NF4/FP4 blocks of 64: absmax in fp32, or 8-bit + fp32 per 256 blocks
            bits = 4 + (8 / 64 + 32 / (64 * 256) if w.double_quant else 32 / 64)
            total += i * o * bits / 8
    return s["layers"] * total


def layer_working_bytes(w: Workload, method: str, act: int) -> float:
    """Bytes per token of one layer's saved tensors during its backward."""
    s = shape(w.model)
    kv = s["kv_heads"] * s["head_dim"]
    base = (11 * s["d"] + 4 * s["ff"] + 2 * kv) * act
    if method in ("lora", "qlora"):  # each adapted linear's dropout output (+ its 1-byte mask)
        base += sum(i for i, _ in linear_shapes(w.model)) * (adapter_bytes(w) + (1 if w.lora_dropout else 0))
    return base


def estimate_memory(w: Workload, st: Strategy) -> dict:
    s = shape(w.model)
    n, W, d, V = num_params(w.model), w.world, s["d"], s["vocab"]
    wb = dtype_bytes(w.dtype)
    tokens = w.micro_batch * w.seq_len
    eight_bit = w.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    zero3 = st.zero == 3
    shard_p = W if zero3 else 1
    temp = (d * d + (0.9 * d * d if zero3 else d * d)) * wb  # reduce + prefetch / allgather buckets
    cpu = 0.0

    if st.method == "full":
        trainable = n
        params = 0.0 if st.offload_params else wb * n / shard_p
        grads = 0.0 if (st.offload_optimizer and st.zero >= 2) else wb * n / (W if st.zero >= 2 else 1)
        master = 0 if w.dtype == "fp32" else 4
        k = master + (2 if eight_bit else 8)
        optim = 0.0 if st.offload_optimizer else k * n / (W if st.zero >= 1 else 1)
        if st.offload_optimizer:
            cpu += (k + 4) * n / W            # states + fp32 gradient partition, per GPU
        if st.offload_params:
            cpu += wb * n / W
        if zero3:  # the gathered LM head / embedding and its gradient, in working precision
            temp += 2 * V * d * wb
        act = wb
    else:  # adapters on a frozen base; see "LoRA / QLoRA" in the module docstring
        peer = w.trainer == "hf-trainer"
        if st.method == "qlora":
            linear = s["layers"] * sum(i * o for i, o in linear_shapes(w.model))
            rest = 4 if peer else wb   # embeddings, LM head, norms: fp32 for the peer, bf16 for zerotune
            params = quantised_bytes(w) + (n - linear) * rest
            act = rest                 # the norm weights' dtype is the residual stream's
        else:
            params = wb * n / shard_p
            act = wb
        trainable = lora_params(w) if st.method in ("lora", "qlora") else int(0.001 * n)
        ab = adapter_bytes(w)
        master = 0 if ab == 4 else 4                     # DeepSpeed's fp32 copy of bf16 adapters
        params += ab * trainable
        grads = ab * trainable
        optim = (master + (2 if eight_bit else 8)) * trainable
    kept = (s["layers"] * d * act * tokens) if st.grad_ckpt else 0.0
    working = layer_working_bytes(w, st.method, act) * tokens * (1 if st.grad_ckpt else s["layers"])
    if st.method == "qlora":  # the largest 4-bit weight, dequantised to bf16 for its matmul
        working += 2 * max(i * o for i, o in linear_shapes(w.model))
    logits = LOGIT_BYTES * tokens * V
    if st.grad_ckpt:
        total = params + grads + optim + temp + kept + max(logits, working)
    else:
        total = params + grads + optim + temp + working + logits
    return {"params": params, "grads": grads, "optimizer": optim, "activations": kept + working,
            "logits": logits, "temporary": temp, "total": total,
            "cpu_per_node": cpu * w.gpus_per_node, "trainable": trainable}


# --------------------------------------------------------------------------- speed
def efficiency(st: Strategy, world: int) -> tuple[float, str]:
    method = st.method if st.method in ("full", "lora", "qlora") else "lora"
    key = (method, st.zero, st.offload_optimizer, st.offload_params)
    mfu, source = EFFICIENCY.get(key, (0.15, "assumed: no measurement for this strategy"))
    if st.zero == 3 and world > 1:
        mfu *= ZERO3_MULTI_GPU
    if not st.grad_ckpt:
        mfu *= NO_CHECKPOINTING
    return mfu, source


# --------------------------------------------------------------------------- strategies
def strategies(method: str) -> list[Strategy]:
    out = []
    for ckpt in (True, False):
        if method == "full":
            out += [Strategy("full", z, grad_ckpt=ckpt) for z in (1, 2, 3)]
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
         price: Optional[float] = None, gpu_type: str = "h100") -> list[Estimate]:
    peak = PEAK_TFLOPS[gpu_type] * 1e12
    fpt = flops_per_token(w.model, w.seq_len)
    rows = []
    for st in strategies(method) + alternatives(method):
        m = estimate_memory(w, st)
        mfu, source = efficiency(st, w.world)
        tps = mfu * peak / fpt
        why = []
        if m["total"] > gpu_memory - RESERVED:
            why.append(f"needs {m['total'] / GIB:.1f} GiB per GPU, {(gpu_memory - RESERVED) / GIB:.1f} usable")
        if m["cpu_per_node"] > cpu_memory * 0.9:
            why.append(f"needs {m['cpu_per_node'] / GIB:.0f} GiB CPU memory per node")
        e = Estimate(st, m["params"], m["grads"], m["optimizer"], m["activations"], m["logits"], m["temporary"],
                     m["total"], m["cpu_per_node"], not why, tps, mfu, source, why_not="; ".join(why))
        if w.train_tokens:
            e.hours = w.train_tokens / (tps * w.world) / 3600
            e.gpu_hours = e.hours * w.world
            e.cost = e.gpu_hours * price if price is not None else None
        rows.append(e)
    return rows


def recommend(rows: list[Estimate], method: str, grad_ckpt: Optional[bool] = None) -> Optional[Estimate]:
    """Fastest strategy of this method that fits; ties go to the one using less GPU memory."""
    ok = [r for r in rows if r.fits and r.strategy.method == method
          and (grad_ckpt is None or r.strategy.grad_ckpt == grad_ckpt)]
    return min(ok, key=lambda r: (-round(r.tokens_per_s, 6), r.total)) if ok else None


# --------------------------------------------------------------------------- from a recipe
def parse_size(text: str) -> float:
    """'80GB', '80G', '80GiB', '512 GB', '1.5T' -> bytes (GB as nvidia-smi means it: GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise RecipeError(f"{text!r} is not a memory size like 80GB or 512G")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def model_config(recipe: Recipe) -> dict:
    path = Path(recipe.model.path).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(recipe.model.path, "config.json")).read_text())
    except Exception as e:
        raise RecipeError(f"model.path: cannot read config.json of {recipe.model.path!r} ({type(e).__name__})") from None


def _count_local_rows(path: Path) -> Optional[tuple[int, int]]:
    """(rows, characters of text) of a local .json/.jsonl file, None for other sources."""
    files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
    rows = chars = 0
    for f in files:
        if f.suffix not in (".json", ".jsonl") or not f.is_file():
            return None
        text = f.read_text(errors="replace")
        if f.suffix == ".jsonl":
            lines = [ln for ln in text.splitlines() if ln.strip()]
            rows += len(lines)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                return None
            rows += len(data) if isinstance(data, list) else 1
        chars += len(text)
    return rows, chars


def estimate_train_tokens(recipe: Recipe, world: int) -> tuple[Optional[float], str]:
    """Tokens the run processes: steps x global batch x tokens per sample (about 3.6 chars a token)."""
    d, t = recipe.data, recipe.train
    rows = chars = 0
    for src in d.train:
        counted = _count_local_rows(Path(src.path).expanduser())
        if counted is None:
            rows = None
            break
        rows += counted[0]
        chars += counted[1]
    per_sample = min(d.max_len, chars / 3.6 / rows) if rows else d.max_len
    try:
        gas = t.accumulation(world)
    except RecipeError:
        gas = max(1, (t.global_batch_size or t.micro_batch_size) // (t.micro_batch_size * world))
    global_batch = t.micro_batch_size * gas * world
    if t.max_steps:
        tokens_per_step = global_batch * (d.max_len if d.packing else per_sample)
        return t.max_steps * tokens_per_step, f"{t.max_steps} steps x {global_batch} samples"
    if rows is None:
        return None, "data size unknown (not local JSON/JSONL): time not estimated"
    train_rows = rows * (1 - d.eval_split)
    tokens = t.epochs * train_rows * per_sample
    return tokens, f"{t.epochs:g} epoch(s) of ~{train_rows:,.0f} samples, ~{per_sample:,.0f} tokens each"


def workload(recipe: Recipe, gpus_per_node: int, nodes: int) -> Workload:
    tokens, note = estimate_train_tokens(recipe, gpus_per_node * nodes)
    m = recipe.method
    return Workload(model=model_config(recipe), dtype=recipe.model.dtype, micro_batch=recipe.train.micro_batch_size,
                    seq_len=recipe.data.max_len, gpus_per_node=gpus_per_node, nodes=nodes,
                    optimizer=recipe.train.optimizer, lora_r=m.lora.r, lora_targets=m.lora.target_modules,
                    lora_dropout=m.lora.dropout, quant_bits=m.quant.bits, double_quant=m.quant.double_quant,
                    train_tokens=tokens, data_note=note)


def choose(recipe: Recipe, gpus_per_node: int, nodes: int = 1, gpu_memory: float = DEFAULT_GPU_MEMORY,
           cpu_memory: float = DEFAULT_CPU_MEMORY) -> Strategy:
    """What `distributed.zero: auto` runs: the fastest fitting strategy of the recipe's method,
    with the recipe's gradient checkpointing (and offload, where the recipe turns it on).
    One-line error when none fits."""
    w = workload(recipe, gpus_per_node, nodes)
    method = recipe.method.kind
    d = recipe.distributed   # offload the recipe asks for stays on
    rows = [r for r in plan(w, method, gpu_memory, cpu_memory)
            if (r.strategy.offload_optimizer or not d.offload_optimizer) and (r.strategy.offload_params or not d.offload_params)]
    best = recommend(rows, method, recipe.train.gradient_checkpointing)
    if best is None:
        smallest = min((r for r in rows if r.strategy.method == method), key=lambda r: r.total)
        raise RecipeError(
            f"distributed.zero: auto: no strategy fits {recipe.model.path} on {w.world} GPU(s) of "
            f"{gpu_memory / GIB:.0f} GiB: the smallest, {smallest.strategy.label}, {smallest.why_not}; "
            "add GPUs, lower train.micro_batch_size or data.max_len, or use method.kind: lora / qlora")
    return best.strategy


def check_fits(recipe: Recipe, gpus_per_node: int, nodes: int = 1, gpu_memory: float = DEFAULT_GPU_MEMORY,
               cpu_memory: float = DEFAULT_CPU_MEMORY) -> Estimate:
    """The estimate of the strategy the (resolved) recipe runs; a one-line error when it cannot fit."""
    w = workload(recipe, gpus_per_node, nodes)
    d = recipe.distributed
    st = Strategy(recipe.method.kind, recipe.zero_stage(), d.offload_optimizer, d.offload_params,
                  recipe.train.gradient_checkpointing)
    m = estimate_memory(w, st)
    mfu, source = efficiency(st, w.world)
    e = Estimate(st, m["params"], m["grads"], m["optimizer"], m["activations"], m["logits"], m["temporary"],
                 m["total"], m["cpu_per_node"], True, 0.0, mfu, source)
    if m["total"] > gpu_memory - RESERVED or m["cpu_per_node"] > cpu_memory * 0.9:
        better = recommend(plan(w, recipe.method.kind, gpu_memory, cpu_memory), recipe.method.kind)
        hint = ("; " + " ".join(f"--set {o}" for o in better.strategy.overrides()) + " fits") if better else ""
        raise RecipeError(
            f"{st.label} needs about {m['total'] / GIB:.1f} GiB per GPU (usable: {(gpu_memory - RESERVED) / GIB:.1f} "
            f"GiB) and {m['cpu_per_node'] / GIB:.0f} GiB CPU memory per node: it will not fit{hint} "
            f"(see `zerotune plan`, or --gpu-memory if your GPUs are larger)")
    return e


# --------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: cluster.gpus_per_node or 1)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: cluster.nodes)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    p.add_argument("--cpu-memory", default=None, help="CPU memory per node (default: cluster.mem or 512GB)")
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


def format_table(rows: list[Estimate], w: Workload, best: Optional[Estimate], gpu_memory: float) -> str:
    head = ["strategy", "params", "grads", "optim", "activ", "logits", "temp", "GPU GiB", "CPU GiB/node",
            "fits", "tok/s/GPU", "time", "GPU-h", "cost"]
    lines = [head]
    for r in rows:
        lines.append([r.strategy.label, _gib(r.params), _gib(r.grads), _gib(r.optimizer), _gib(r.activations),
                      _gib(r.logits), _gib(r.temporary), _gib(r.total), _gib(r.cpu_per_node),
                      "yes" if r.fits else "NO", f"{r.tokens_per_s:,.0f}", _hours(r.hours),
                      (f"{r.gpu_hours:.1f}" if r.gpu_hours >= 10 else f"{r.gpu_hours:.2f}")
                      if r.gpu_hours is not None else "?",
                      f"{r.cost:,.2f}" if r.cost is not None else "-"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)) for row in lines]
    s = shape(w.model)
    out.insert(0, f"model: {num_params(w.model) / 1e9:.2f}B parameters (d={s['d']}, layers={s['layers']}, "
                  f"vocab={s['vocab']}), {w.dtype}; {w.world} GPU(s) = {w.nodes} node(s) x {w.gpus_per_node}, "
                  f"{gpu_memory / GIB:.0f} GiB each; micro-batch {w.micro_batch} x {w.seq_len} tokens")
    out.insert(1, f"data: {w.data_note}" + (f" = {w.train_tokens / 1e6:,.1f}M tokens" if w.train_tokens else ""))
    out.insert(2, "")
    out.append("")
    out.append("GPU GiB = params + grads + optim + temp + kept activations + max(logits, one layer's recompute);"
               f" fits leaves {RESERVED / GIB:.1f} GiB for CUDA/NCCL.")
    out.append("Speed from MFUs measured for the HF Trainer peer on one H100 (../shared/bench/README.md);"
               " rows without a measurement use assumed values.")
    if best is not None:
        out.append(f"recommended: {best.strategy.label} ({best.tokens_per_s:,.0f} tokens/s/GPU, "
                   f"{_gib(best.total)} GiB per GPU)  ->  " + " ".join(f"--set {o}" for o in best.strategy.overrides()))
    else:
        out.append("recommended: nothing fits; add GPUs or nodes, lower micro_batch_size or max_len, or use LoRA/QLoRA")
    return "\n".join(out)


def run(args) -> int:
    recipe = load_recipe(args.recipe, args.set)
    gpus = args.gpus or recipe.cluster.gpus_per_node or 1
    nodes = args.nodes or recipe.cluster.nodes
    gpu_memory = parse_size(args.gpu_memory)
    cpu_text = args.cpu_memory or (recipe.cluster.mem if recipe.cluster.mem not in (None, "0") else None)
    cpu_memory = parse_size(cpu_text) if cpu_text else DEFAULT_CPU_MEMORY
    w = workload(recipe, gpus, nodes)
    rows = plan(w, recipe.method.kind, gpu_memory, cpu_memory, args.price, args.gpu_type)
    best = recommend(rows, recipe.method.kind)
    if args.json:
        print(json.dumps({"workload": {k: v for k, v in asdict(w).items() if k != "model"},
                          "recommended": best.strategy.label if best else None,
                          "rows": [{**asdict(r), "strategy": r.strategy.label, **asdict(r.strategy)} for r in rows]},
                         indent=1))
    else:
        print(format_table(rows, w, best, gpu_memory))
    return 0 if best is not None else 1
