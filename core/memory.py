"""The memory and speed model: bytes per GPU and tokens/s of one strategy for one workload.
Torch-free: the planner (launcher/plan.py) and the OOM advice (training/run/diagnostics.py) use it.

The memory model (bytes, per GPU; N parameters, W GPUs, B x S tokens per micro-batch):

  parameters   2N (bf16/fp16) or 4N (fp32); ZeRO-3 shards them (/W); offload_params: on CPU
  gradients    2N or 4N; ZeRO-2/3 shard them (/W); with offload_optimizer they go to CPU
  optimizer    AdamW in mixed precision: fp32 master + m + v = 12N (ZeRO paper's K=12); 8N in
               fp32; 8-bit AdamW: master + 2 bytes. ZeRO-1/2/3 shard them (/W); offload: on CPU
  activations  gradient checkpointing by the layer: of L decoder layers the first k are checkpointed
               (each keeps only its input, B S d; the first o of those keep it in pinned CPU memory,
               train.offload_activations, plus one prefetched copy on the GPU), the other L - k keep
               their whole working set; one checkpointed layer's working set exists while it is
               recomputed. The earliest layers are the ones checkpointed: the backward frees the
               later, uncheckpointed layers' activations before it reaches them, so a recompute
               never meets those (and an offloaded input has the whole forward and backward to move).
               Working set of a Llama-style layer, per token: (11 d + 4 ff + 2 kv) x act bytes
               (norm inputs in fp32 and, for the norm weights' gradients, in bf16, q, rotated q/k,
               k/v, attention out, gate, up, silu(gate), gate*up; 1 d to spare); frozen norm
               weights (PEFT) keep 2 d less (the bf16 copies). LoRA adds, for every adapted linear, lora_A's r outputs and
               (lora.dropout > 0) its dropout output, in the adapter's dtype, and the 1-byte dropout
               mask, or (no dropout, adapters in another dtype: the HF peer's fp32) its cast input;
               without dropout and in the model's dtype lora_A saves the very input already counted,
               and so does zerotune's with dropout where it draws the mask again in the backward
               (training/model/lora_fused.py: layers not compiled, Workload.lora_dropout_fused).
               train.tiled_mlp: the MLP's part (4 ff, and its adapters') exists for one tile only.
               Checked against autograd's saved tensors of a real layer (tests/test_layer_bytes.py).
               A recomputed layer's backward also holds its own gradients, (4 d + 2 kv) x act a
               token: the output's, the residual's, attention's dout, dq, dk, dv (measured at 8B LoRA,
               131,072 tokens, every layer recomputed: 62.2 GiB, estimated 65.1, 60.6 without them).
               train.recompute_attention: false: a checkpointed layer also keeps attention's output
               (heads x head_dim x act) and its fp32 softmax statistics (4 bytes a head).
  logits       B S V x 12 bytes at the loss backward: fp32 log-probs saved by log_softmax, the
               gradient coming in and the gradient going out (all fp32). With the chunked loss
               (train.fused_loss, training/model/loss.py) the logits of one chunk of at most
               FUSED_CHUNK tokens (fp32, plus their bf16 matmul output and gradient: 8 bytes a
               logit), the head's fp32 gradient V d x 4 and its cast V d x act bytes, and the
               hidden states' gradient B S d x act bytes.
  kernels      model.kernels: liger. Its fused linear CE (ZeRO 0-2 only) counts as the chunked loss; its
               SwiGLU (recomputes silu(gate)) saves ff x act bytes a token per layer, its RMSNorm (no
               fp32 upcasts kept) d x act per norm; RoPE not counted. Conservative (liger claims more).
  fp8          train.precision fp8 on a LoRA base: the frozen decoder linears keep an FP8 copy, 1 byte a
               weight, beside the bf16 one, and the backward transposes the largest into a temporary.
  temporary    ZeRO communication buckets (reduce d^2, prefetch 0.9 d^2 elements) and, under
               ZeRO-3, the gathered LM-head/embedding weight and its gradient.

  total = parameters + gradients + optimizer + temporary + kept activations
          + max(uncheckpointed layers' activations + logits, one layer's working set)
            (the loss and a layer's recomputation never hold memory at the same time)

The planner (launcher/plan.py) resolves the `auto`s from this: the fewest checkpointed layers
that fit, the MLP tiled only when nothing fits untiled, the fewest offloaded layers only when
nothing fits on the GPU; tokens/s follow the fraction of layers recomputed (core/layers.py).

LoRA / QLoRA on zerotune's path (training/model/build.py + training/run/engine.py, bf16 recipe). peft
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
The HF Trainer peer (benchmarks/peer_hf.py, Workload(trainer="hf-trainer")) has no DeepSpeed
cast: its adapters stay fp32 (4 + 4 bytes parameters and gradients, no master copy), and for QLoRA
the non-quantised parameters stay fp32 (4 bytes) and their fp32 norm weights make the residual
stream, and so the kept and recomputed activations, fp32.

Speed (tokens/s per GPU from measured MFUs): core/speed.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .estimate import Estimate  # noqa: F401  (the planner's row; core/estimate.py)
from .families import choose_attention
from .flops import dense_linears, linear_shapes, num_params, shape
from .io import GIB, read_model_config

DEFAULT_GPU_MEMORY = 80 * GIB      # an 80 GB A100/H100 (nvidia-smi's 80 GB are GiB)
DEFAULT_CPU_MEMORY = 512 * GIB     # per node
RESERVED = 2.5 * GIB               # CUDA context, NCCL buffers, allocator fragmentation
LOGIT_BYTES = 12                   # per logit element, see the module docstring
FUSED_CHUNK = 4096                 # tokens per chunk of the chunked loss (training/model/loss.py CHUNK_TOKENS)
# model.kernels: liger (training/model/kernels.py) for these config model_types (RMSNorm + SwiGLU + RoPE)
LIGER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
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
class Workload:
    """What the estimate needs to know about a run."""
    model: dict                  # Hugging Face config.json
    dtype: str = "bf16"
    micro_batch_size: int = 1
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
    fused_loss: bool = False     # the chunked loss: the full logits are never held
    sequence_parallel: int = 1   # GPUs sharing one sequence: each holds seq_len / N tokens (core/long_context.py)
    tiled_mlp: bool = False      # train.tiled_mlp: the MLP's intermediates exist for one tile of tokens
    offload_activations: object = False  # train.offload_activations: True all checkpointed inputs on the CPU, N the first N
    ckpt_layers: Optional[int] = None    # with Strategy.grad_ckpt: the first N layers checkpointed (None: all)
    keep_attention: bool = False         # not train.recompute_attention: checkpointed layers keep attention's output
    async_save: bool = False     # checkpoint.async_save: a save's snapshot waits in CPU memory (core/checkpoint_cost.py)
    packed: bool = False; attn: str = "sdpa"   # data.packing, model.attn_implementation: sdpa's packed-row mask
    kernels: str = "none"        # model.kernels as resolved: "liger" counts its savings (module docstring)
    fp8_base: bool = False       # train.precision fp8 on a LoRA base: each frozen decoder linear keeps an FP8 copy
    lora_dropout_fused: bool = False   # LoRA's dropout drawn again in the backward (training/model/lora_fused.py)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


# --------------------------------------------------------------------------- memory
def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def adapted_linears(w: Workload) -> dict[str, tuple[int, int]]:
    """Llama's name -> (in, out) of every linear LoRA adapts in one decoder layer (MoE: experts frozen)."""
    s = shape(w.model)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"] if s["gated"]
                                                       else ["up_proj", "down_proj"])
    linears = dict(zip(names, dense_linears(w.model)))
    return linears if w.lora_targets == "all-linear" else {n: io for n, io in linears.items() if n in w.lora_targets}


def lora_params(w: Workload) -> int:
    """LoRA parameters: r x (in + out) for every adapted linear of every layer."""
    return shape(w.model)["layers"] * sum(w.lora_r * (i + o) for i, o in adapted_linears(w).values())


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


def layer_working_bytes(w: Workload, method: str, act: int, tiled: bool = False) -> float:
    """Bytes per token of one layer's saved tensors during its backward; tiled: without the MLP's,
    which exist for one tile (module docstring, "activations")."""
    s = shape(w.model)
    kv = s["kv_heads"] * s["head_dim"]
    attn, mlp = (11 * s["d"] + 2 * kv) * act, 4 * s["ff"] * act
    if w.kernels == "liger" and s["gated"]:   # fused SwiGLU and RMSNorm (module docstring, "kernels")
        attn, mlp = attn - 2 * s["d"] * act, mlp - s["ff"] * act
    if method != "full":   # frozen norm weights: no bf16 copy of each norm's input kept for their gradient
        attn -= 2 * s["d"] * act
    if method in ("lora", "qlora"):
        ab, linears = adapter_bytes(w), adapted_linears(w)
        dropped = w.lora_dropout and not w.lora_dropout_fused
        own = ab + 1 if dropped else (ab if ab != act else 0)   # a dropout output + mask, or a cast
        for name, (i, _) in linears.items():
            extra = w.lora_r * ab + i * own
            attn, mlp = (attn + extra, mlp) if name in ("q_proj", "k_proj", "v_proj", "o_proj") else (attn, mlp + extra)
        if own:   # then the inputs the adapted linears alone kept are not kept
            attn -= s["d"] * act if {"q_proj", "k_proj", "v_proj"} <= linears.keys() else 0   # the attention norm's out
            mlp -= s["d"] * act if ({"gate_proj", "up_proj"} if s["gated"] else {"up_proj"}) <= linears.keys() else 0
            mlp -= s["ff"] * act if "down_proj" in linears else 0   # act(gate) * up
    return attn + (0 if tiled else mlp)


def loss_bytes(w: Workload, tokens: int, vocab: int, d: int, act: int) -> float:
    """Peak bytes of the loss and its backward (module docstring, "logits")."""
    if not w.fused_loss:
        return LOGIT_BYTES * tokens * vocab
    return 8 * min(tokens, FUSED_CHUNK) * vocab + vocab * d * (4 + act) + tokens * d * act


def layer_split(w: Workload, st: Strategy) -> tuple[int, int]:
    """(checkpointed, offloaded) decoder layers of the workload under `st` (module docstring)."""
    layers = shape(w.model)["layers"]
    k = (layers if w.ckpt_layers is None else max(0, min(w.ckpt_layers, layers))) if st.grad_ckpt else 0
    o = w.offload_activations
    return k, min(k, o if type(o) is int else (k if o else 0))


def activation_bytes(w: Workload, st: Strategy, act: int) -> dict:
    """Bytes per GPU (module docstring): kept (checkpointed inputs on the GPU), offloaded (on the CPU),
    held (uncheckpointed layers' saved tensors), working (one recompute + a prefetched input; 0 without
    checkpointing); train.tiled_mlp: the MLP's intermediates exist for one tile of ~d tokens a row."""
    s = shape(w.model)
    tokens = w.micro_batch_size * w.seq_len
    k, o = layer_split(w, st)
    x = s["d"] * act * tokens                   # one layer's input
    per_token = layer_working_bytes(w, st.method, act, tiled=w.tiled_mlp)
    tile = 0.0
    if w.tiled_mlp:   # one tile's MLP part
        mlp = layer_working_bytes(w, st.method, act) - per_token
        tile = mlp * min(tokens, w.micro_batch_size * s["d"])
    held = (s["layers"] - k) * per_token * tokens + (tile if k < s["layers"] else 0.0)
    grads = (4 * s["d"] + 2 * s["kv_heads"] * s["head_dim"]) * act   # a backward's own gradients (docstring)
    working = ((per_token + grads) * tokens + tile + (x if o else 0.0)) if k else 0.0
    # train.recompute_attention: false: each checkpointed layer keeps the attention kernel's output and its
    # fp32 softmax statistics on the GPU (offloaded or not)
    attention = k * (s["heads"] * s["head_dim"] * act + 4 * s["heads"]) * tokens if w.keep_attention else 0.0
    return {"kept": (k - o) * x + attention, "offloaded": o * x, "held": held, "working": working, "ckpt_layers": k,
            "offload_layers": o}


def estimate_memory(w: Workload, st: Strategy) -> dict:
    s = shape(w.model)
    n, W, d, V = num_params(w.model), w.world, s["d"], s["vocab"]
    wb = dtype_bytes(w.dtype)
    tokens = w.micro_batch_size * w.seq_len
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
            if w.fp8_base:   # training/model/fp8_frozen.py: 1 byte a weight kept, the largest transposed per backward
                converted = dense_linears(w.model)     # experts stay bf16
                params += s["layers"] * sum(i * o for i, o in converted)
                temp += max(i * o for i, o in converted)
        trainable = lora_params(w) if st.method in ("lora", "qlora") else int(0.001 * n)
        ab = adapter_bytes(w)
        master = 0 if ab == 4 else 4                     # DeepSpeed's fp32 copy of bf16 adapters
        params += ab * trainable
        grads = ab * trainable
        optim = (master + (2 if eight_bit else 8)) * trainable
    params += wb * n if zero3 and W == 1 and not st.offload_params and st.method != "qlora" else 0   # ds_config.py
    a = activation_bytes(w, st, act)
    kept, held, working = a["kept"], a["held"], a["working"]
    cpu += a["offloaded"]
    if st.method == "qlora":  # the largest 4-bit weight, dequantised to bf16 for its matmul
        deq = 2 * max(i * o for i, o in linear_shapes(w.model))
        held += deq if a["ckpt_layers"] < s["layers"] else 0.0
        working += deq if working else 0.0
    liger_loss = w.kernels == "liger" and st.zero < 3   # liger's fused linear cross entropy, counted as chunked
    logits = loss_bytes(replace(w, fused_loss=True) if liger_loss else w, tokens, V, d, act)
    total = params + grads + optim + temp + kept + max(held + logits, working)
    return {"params": params, "grads": grads, "optimizer": optim, "activations": kept + held + working,
            "kept": kept, "held": held, "working": working, "ckpt_layers": a["ckpt_layers"],
            "offload_layers": a["offload_layers"], "logits": logits, "temporary": temp, "total": total,
            "cpu_per_node": cpu * w.gpus_per_node, "trainable": trainable}


def workload_of(recipe, gpus_per_node: int, nodes: int = 1, train_tokens: Optional[float] = None,
                data_note: str = "") -> Workload:
    """The Workload of a recipe: model shape, precision, batch geometry and method settings."""
    m, t, config = recipe.method, recipe.train, read_model_config(recipe.model.path)
    attn = choose_attention(config, recipe.model.attn_implementation, cuda=True)   # auto: the family's kernel
    return Workload(model=config, dtype=recipe.model.dtype,
                    micro_batch_size=recipe.train.micro_batch_size, seq_len=recipe.data.max_len,
                    gpus_per_node=gpus_per_node, nodes=nodes, optimizer=recipe.train.optimizer,
                    lora_r=m.lora.r, lora_targets=m.lora.target_modules, lora_dropout=m.lora.dropout,
                    quant_bits=m.quant.bits, double_quant=m.quant.double_quant,
                    train_tokens=train_tokens, data_note=data_note,
                    fused_loss=recipe.train.fused_loss and m.kind in ("full", "lora", "qlora"),
                    sequence_parallel=recipe.distributed.sequence_parallel, packed=recipe.data.packing,
                    tiled_mlp=t.tiled_mlp is True,   # auto: the planner decides (launcher/plan.py)
                    offload_activations=False if t.offload_activations == "auto" else t.offload_activations,
                    ckpt_layers=t.gradient_checkpointing if type(t.gradient_checkpointing) is int else None,
                    keep_attention=t.recompute_attention is False,   # auto: the planner decides (launcher/plan.py)
                    async_save=recipe.checkpoint.async_save,
                    attn="sdpa" if attn == "auto" else attn, kernels=recipe.model.kernels,
                    fp8_base=t.precision == "fp8" and m.kind == "lora",
                    # fused unless the layers may be compiled (build.py: not with liger's kernels, nor QLoRA)
                    lora_dropout_fused=m.kind == "qlora" or t.compile is False or recipe.model.kernels == "liger")
