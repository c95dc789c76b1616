"""The model a recipe asks for: HF weights, dtype, attention kernel, gradient checkpointing,
and the training method on top (full, or an adapter method: LoRA, QLoRA, IA3, prompt
tuning, p-tuning, prefix tuning, bottleneck adapters).

    model = build_model(recipe, ds_config)     # on every rank, before the DeepSpeed engine

For ZeRO-3, transformers builds the model under `deepspeed.zero.Init` (through
HfDeepSpeedConfig), so every rank only ever holds its shard of a model larger than one GPU.
For adapter methods the base is frozen (replicated on every GPU at ZeRO 0-2) and only the
adapter's parameters have requires_grad, so only they reach the optimizer (engine.py).
QLoRA loads the base in 4-bit (bitsandbytes NF4/FP4) and puts LoRA on top.
"""
from __future__ import annotations

import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from zerotune.core.recipe import RecipeError

from zerotune.core.families import choose_attention
from zerotune.training.model import fp8, kernels, long_sequence, lora_fused, moe

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEFT_KINDS = ("lora", "qlora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")  # built by HF peft

_hf_ds_config = None  # must stay alive while the model is built (transformers holds a weak reference)


def quantization_config(recipe, zero_stage: int = 0):
    """bitsandbytes settings of a QLoRA base (None for every other method)."""
    if recipe.method.kind != "qlora":
        return None
    from transformers import BitsAndBytesConfig
    q = recipe.method.quant
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        # ZeRO-3 partitions parameters of one float dtype: store the packed 4-bit data in it
        bnb_4bit_quant_storage=DTYPES[recipe.model.dtype] if zero_stage == 3 else torch.uint8)


def peft_config(recipe, model=None):
    """The HF peft config of the recipe's method (None for full and bottleneck adapters). With
    `model`, LoRA's all-linear on a mixture of experts names the layers outside its experts."""
    import peft
    m, kind = recipe.method, recipe.method.kind
    if kind in ("lora", "qlora"):
        lo = m.lora
        return peft.LoraConfig(
            task_type="CAUSAL_LM", r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
            target_modules=moe.lora_targets(model, lo.target_modules), modules_to_save=lo.modules_to_save or None,
            use_rslora=lo.use_rslora, use_dora=lo.use_dora)
    if kind == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=m.ia3.target_modules,
                              feedforward_modules=m.ia3.feedforward_modules)
    p = m.prompt
    if kind == "prompt_tuning":
        if p.init == "text" and not p.init_text:
            raise RecipeError("method.prompt.init_text: required when method.prompt.init is 'text'")
        text = p.init == "text"
        return peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
            prompt_tuning_init="TEXT" if text else "RANDOM", prompt_tuning_init_text=p.init_text if text else None,
            tokenizer_name_or_path=(recipe.model.tokenizer or recipe.model.path) if text else None)
    if kind == "p_tuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                        encoder_hidden_size=p.encoder_hidden_size)
    if kind == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens)
    return None


def apply_method(model, recipe):
    """Freeze the base and add the recipe's adapter; returns the model to train (full: unchanged)."""
    kind = recipe.method.kind
    if kind == "full":
        return model
    if kind == "adapter":
        from zerotune.training.model.adapters import add_adapters
        return add_adapters(model, recipe.method.adapter)
    import peft
    return peft.get_peft_model(model, peft_config(recipe, model))


def keep_4bit_cpu_layout(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel the first time its layer
    runs in eval mode without gradients on such a CPU. The repacked layout changes the layer's
    state dict (absmax, quant_state: checkpoints, exports and merges see other tensors) and fails
    outright on sizes that are not multiples of 32 / the block (stories260K's 172-wide MLP). Keep
    the portable layout everywhere; this only matters on CPUs (GPU runs never repack)."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def build_model(recipe, ds_config: dict):
    global _hf_ds_config
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    kind = recipe.method.kind
    if stage == 3 and kind not in ("full", "lora", "qlora"):
        raise RecipeError(f"method.kind: {kind} trains with distributed.zero 0, 1 or 2 (the frozen base is "
                          f"replicated); ZeRO-3 is for full, lora and qlora")
    if kind == "prefix_tuning" and recipe.train.gradient_checkpointing:
        raise RecipeError("method.kind prefix_tuning: set train.gradient_checkpointing: false "
                          "(peft's prefix tuning does not support it)")
    _hf_ds_config = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    # the model class imported before zero.Init patches tensor constructors (importing it under the patch fails)
    import torch._dynamo  # noqa: F401
    config = AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        pass  # remote-code models resolve their class in from_pretrained
    quant = quantization_config(recipe, stage)
    extra = {"quantization_config": quant} if quant is not None else {}
    if torch.cuda.is_available() and stage < 3:  # load straight onto this rank's GPU (bitsandbytes quantises there)
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.path,
        dtype=DTYPES[recipe.model.dtype],
        attn_implementation=attention(recipe, config),
        trust_remote_code=recipe.model.trust_remote_code,
        **extra,
    )
    moe.prepare(model, stage)   # ZeRO-3 leaf modules, the router's aux loss (training/model/moe.py)
    whole_layers_as_zero3_leaves(model, ds_config.get("zero_optimization", {}), kind)
    liger = kernels.apply(model, recipe)   # model.kernels: fused norms, SwiGLU, RoPE (training/model/kernels.py)
    gc_kwargs = long_sequence.checkpoint_kwargs(recipe.train)   # non-reentrant; attention kept or recomputed
    ckpt = bool(recipe.train.gradient_checkpointing)   # true, auto (unresolved: all) or N > 0 layers
    if quant is not None:
        keep_4bit_cpu_layout(model)
        # QLoRA paper recipe: freeze, norms in fp32, checkpointing with inputs that carry grads
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if ckpt:
        model.config.use_cache = False
        long_sequence.checkpoint_first(model, recipe)   # N: only the first N decoder layers recompute
    flce = liger and stage < 3   # liger's fused linear CE reads lm_head.weight whole: ZeRO 0-2 only
    if (recipe.train.fused_loss is True or flce) and kind in ("full", "lora", "qlora"):   # auto: resolved
        from zerotune.training.model.loss import enable
        enable(model, liger=flce)   # the logits are never materialised whole (training/model/loss.py)
    long_sequence.enable(model, recipe)   # tiled MLP, offloaded checkpoints (training/model/long_sequence.py)
    reshaped = long_sequence.options(recipe) + (["model.kernels liger"] if liger else [])
    compiled = compile_if_wanted(model, recipe.train.compile, kind, stage, reshaped)
    model = apply_method(model, recipe)
    if kind in ("lora", "qlora") and not compiled:   # inductor fuses its own in compiled layers
        lora_fused.fuse(model, zero3=stage == 3)   # dropout drawn again, lora_B's add in its GEMM (model/lora_fused.py)
    leaf_inputs_need_grad(model)   # ZeRO-3 leaves (layers, MoE blocks): their gradients reduced after their backward
    return fp8.apply(model, recipe, stage)   # train.precision: FP8 linears (model/fp8.py)


def whole_layers_as_zero3_leaves(model, zero: dict, kind: str = "full") -> int:
    """ZeRO-3 that never partitions a parameter away (one process: launcher/ds_config.py keeps
    every parameter whole) makes each decoder layer one ZeRO-3 leaf module: DeepSpeed's
    fetch/release hooks then run once per layer instead of once per linear, norm and block (13
    modules a Llama layer), and the maths is unchanged. On CPU (benchmarks/zero3_hooks_cpu.py:
    gloo, one process, a 16-layer tiny Llama, the step being the host's bookkeeping) ZeRO-3's step
    went from 117 ms to 73 ms (ZeRO-0: 37 ms); with checkpointing 232 -> 127 ms (70); LoRA 242 -> 134 (52). With
    partitioned parameters a leaf gathers its whole layer at once, which costs GPU memory the
    planner does not count yet: not done there. Full fine-tunes and LoRA (its adapters, added
    inside the layers later, belong to their layer's leaf: leaf_inputs_need_grad). Returns how
    many layers are leaves."""
    threshold = zero.get("stage3_param_persistence_threshold")
    layers = long_sequence.decoder_layers(model)
    if kind not in ("full", "lora") or zero.get("stage") != 3 or not isinstance(threshold, int) or not layers:
        return 0
    if any(getattr(p, "ds_numel", p.numel()) > threshold for p in model.parameters()):
        return 0   # some parameter is partitioned: DeepSpeed's per-module gathering stays
    from deepspeed.utils import set_z3_leaf_modules
    set_z3_leaf_modules(model, list({type(layer) for layer in layers}))
    return len(layers)


def leaf_inputs_need_grad(model) -> bool:
    """ZeRO-3 reduces a leaf module's gradients in the module's full backward hook (DeepSpeed's
    stage3.py create_reduce_and_remove_grad_hooks). Where no input of the module requires grad,
    PyTorch runs that hook as soon as the module's output gradient arrives, before the module's
    own backward: the first decoder layer of a LoRA run (frozen embeddings, no checkpointing) had
    its adapters' gradients reduced before they existed ("The size of tensor a (0) must match the
    size of tensor b (4)"). So where a leaf holds a trainable parameter and the input embeddings
    are frozen, the embeddings' output requires grad (transformers' enable_input_require_grads,
    as checkpointing with PEFT does) and every leaf's hook runs after its backward. It costs the
    first layer's input gradient. Returns whether it was needed."""
    from deepspeed.utils import z3_leaf_module
    if not any(p.requires_grad for m in model.modules() if z3_leaf_module(m) for p in m.parameters()):
        return False
    if any(p.requires_grad for p in model.get_input_embeddings().parameters()):
        return False
    model.enable_input_require_grads()
    return True


def attention(recipe, config) -> str | None:
    """model.attn_implementation on this rank: explicit as given; auto -> the family's fastest
    kernel on this rank's GPU (core/families.py: choose_attention). A local run's auto was already
    resolved by the launcher (launcher/prepare.py); a Slurm job's is decided here, where the GPU is
    (a login node has none). None: transformers' own default (a family zerotune does not know)."""
    chosen = choose_attention(config.to_dict(), recipe.model.attn_implementation, torch.cuda.is_available())
    return None if chosen == "auto" else chosen


def kernels_report(model) -> str:
    """What this rank built: 'attention sdpa, kernels none' (rank 0 prints it: a Slurm job's auto
    is decided on the ranks, RUN_DIR/recipe.yaml keeps auto)."""
    attn = getattr(model.config, "_attn_implementation", None) or "default"
    return f"attention {attn}, kernels {getattr(model, '_zerotune_kernels', 'none')}"


def wants_compile(setting, kind: str, stage: int, long: list[str] | None = None) -> bool:
    """train.compile: true / false as given; auto: on a CUDA GPU for full and LoRA at ZeRO 0-2,
    unless a long-sequence option reshapes the layer (sequence parallelism's exchanges inside
    attention, tiled MLP, offloaded checkpoints: not compiled)."""
    if setting == "auto":
        return torch.cuda.is_available() and stage < 3 and kind in ("full", "lora") and not long
    if setting and long:
        raise RecipeError(f"train.compile: true does not run with {', '.join(long)} "
                          "(use train.compile: auto or false)")
    return bool(setting)


def compile_if_wanted(model, setting, kind: str, stage: int, reshaped: list[str]) -> bool:
    """train.compile as wants_compile decides (auto: rank 0 says what it chose); returns whether compiled."""
    compiled = wants_compile(setting, kind, stage, reshaped)
    if setting == "auto" and int(os.environ.get("RANK", "0")) == 0:   # the launcher resolves it
        print(f"zerotune: train.compile auto -> {str(compiled).lower()} (decided on this rank: CUDA "
              f"{'available' if torch.cuda.is_available() else 'not available'})", file=sys.stderr, flush=True)
    if compiled:
        compile_layers(model, kind, stage)
    return compiled


def compile_layers(model, kind: str, stage: int) -> None:
    """torch.compile every decoder layer in place (Module.compile keeps parameter names, so
    checkpoints and exports are unchanged). Identical layers share one compiled graph. Not under
    ZeRO-3, whose parameter hooks break the graphs, nor for 4-bit layers (bitsandbytes' kernels)."""
    if stage == 3 or kind not in ("full", "lora"):
        raise RecipeError(f"train.compile: true works with method.kind full or lora at distributed.zero 0-2 "
                          f"(this run: {kind}, ZeRO-{stage})")
    for layer in long_sequence.decoder_layers(model, "train.compile"):
        layer.compile()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at full size and 4-bit
    packed weights at their unpacked size (as peft's print_trainable_parameters does)."""
    def numel(p):
        n = getattr(p, "ds_numel", p.numel())
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()  # two 4-bit values per byte of storage
        return n
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def trainable_report(model, recipe) -> str:
    """One line for the console and TensorBoard: method, trainable / total parameters."""
    trainable, total = count_parameters(model)
    return (f"method {recipe.method.kind}: {trainable:,} / {total:,} parameters trainable "
            f"({100 * trainable / max(total, 1):.4f}%)")
