"""`zerotune export`: a run's checkpoint -> a Hugging Face model folder or a PEFT adapter folder.

    zerotune export runs/demo --out exported/               # newest complete checkpoint
    zerotune export runs/lora --checkpoint step-200 --out adapter/
    zerotune export runs/qlora --merge --out merged/         # adapter merged into the (dequantised) base

Runs on CPU, without the GPUs the run trained on. A full run's ZeRO shards are consolidated
with DeepSpeed's zero_to_fp32 helpers in lazy mode and written tensor by tensor into
safetensors shards, so an 8B model never needs two copies in RAM. A PEFT run's checkpoint
holds only the trainable parameters; they are written as a standard PEFT adapter folder
(adapter_config.json + adapter_model.safetensors) that `PeftModel.from_pretrained` loads,
or, for bottleneck adapters, a zerotune adapter folder (training/model/adapters.py).

The training loop calls `save_final(engine, model, recipe, out, rank)` at the end of a run to write RUN_DIR/final the same way.
Checkpoint files are read with torch.load(weights_only=True) only. Where the folder is written,
and what an existing --out may hold for it to be replaced: training/export/folder.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from zerotune.core.io import parse_size
from zerotune.core.layout import CHECKPOINTS_DIR, RECIPE_FILE, checkpoints_dir

from zerotune.training.checkpoint.safe_load import ZERO_TO_FP32, safe_load, safe_loads_in
from zerotune.training.export.folder import (ExportError, base_model_id, check_out, finish, fresh_tmp, replace_dir,  # noqa: F401
                            save_side_files)

HELP = "write a Hugging Face model or PEFT adapter folder from a run's checkpoint (CPU only)"
DESCRIPTION = """Write a Hugging Face folder (safetensors shards, config, tokenizer, generation config)
from a run's ZeRO checkpoint, or, for adapter methods, a PEFT adapter folder that
PeftModel.from_pretrained loads. --merge writes the base model with the adapter merged in
(a QLoRA base is dequantised to method.quant.compute_dtype first).

  zerotune export runs/demo --out exported/demo
  zerotune export runs/lora --checkpoint step-200 --out adapters/lora
  zerotune export runs/qlora --merge --out merged/qlora

An existing --out is replaced only when it is an earlier export of the same run (every export
holds a .zerotune-export.json marker) or with --force; never the run folder, a folder above it
or inside it (other than RUN_DIR/final), or the working directory."""

MERGEABLE = ("lora", "qlora", "ia3")
MODEL_STATES = "mp_rank_00_model_states.pt"


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="the run folder (holds recipe.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest",
                   help="step-N, a checkpoint folder, or latest (default: newest complete checkpoint)")
    p.add_argument("--out", required=True,
                   help="output folder; an existing one is replaced only if it is an export of this run")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that is not an export of this run (never the run folder)")
    p.add_argument("--merge", action="store_true", help="adapter runs: write the base with the adapter merged in")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")


def run(args) -> int:
    from zerotune.core.recipe_load import load_run_recipe
    run_dir = Path(args.run_dir)
    if not (run_dir / RECIPE_FILE).is_file():
        raise ExportError(f"{run_dir}: not a run folder (no recipe.yaml)")
    out = Path(args.out)
    check_out(out, run_dir, args.force)   # before anything is read or written
    recipe = load_run_recipe(run_dir)
    ckpt = find_checkpoint(run_dir, args.checkpoint)
    what = export_checkpoint(recipe, ckpt, out, merge=args.merge, max_shard_size=int(parse_size(args.max_shard_size)),
                             force=args.force, run_dir=run_dir)
    print(f"zerotune: exported {ckpt} -> {out} ({what})")
    return 0


# ----------------------------------------------------------------------------- finding things
def find_checkpoint(run_dir: Path, which: str) -> Path:
    from zerotune.core.layout import MARKER, complete_checkpoints, tag
    if which == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise ExportError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
        return found[-1]
    path = Path(which)
    if not path.is_dir():
        name = which
        if which.startswith("step-") and which[5:].isdigit():
            name = tag(int(which[5:]))
        path = checkpoints_dir(run_dir) / name
    if not (path / MARKER).is_file():
        have = ", ".join(p.name for p in complete_checkpoints(run_dir)) or "none"
        raise ExportError(f"--checkpoint {which}: {path} is not a complete checkpoint (complete ones: {have})")
    return path


def zero_stage(ckpt: Path) -> int:
    """The ZeRO stage a checkpoint was written with (its file layout says)."""
    if list(ckpt.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        return 3
    if list(ckpt.glob("*_optim_states.pt")):
        return 2  # 1 and 2 share the layout
    return 0


def module_states(ckpt: Path) -> dict:
    """The `module` state dict of a ZeRO 0/1/2 checkpoint (all parameters, or only the
    trainable ones when frozen parameters were excluded)."""
    return safe_load(ckpt / MODEL_STATES, map_location="cpu", mmap=True)["module"]


def _refuse_pickles(ckpt: Path, error: Exception):
    import pickle
    if isinstance(error, pickle.UnpicklingError):
        raise ExportError(f"{ckpt}: refusing to load a checkpoint file that holds more than tensors and plain "
                          f"data ({str(error).splitlines()[0][:200]})") from None
    raise error


def checkpoint_tensors(ckpt: Path, trainable_only: bool) -> dict:
    """name -> tensor (or a lazy DeepSpeed GatheredTensor: call .contiguous()) of a checkpoint.
    ZeRO 1-3: the fp32 master weights; ZeRO 0: the module's weights."""
    stage = zero_stage(ckpt)
    try:
        if stage == 0 or (stage < 3 and trainable_only):
            return module_states(ckpt)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with safe_loads_in(ZERO_TO_FP32):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True,
                                                            exclude_frozen_parameters=trainable_only)
    except Exception as e:
        _refuse_pickles(ckpt, e)


def materialise(t):
    return t.contiguous() if not hasattr(t, "detach") else t.detach()


# ----------------------------------------------------------------------------- HF folders
def meta_model(recipe):
    """The recipe's model (base + method) with every tensor on the meta device: names and shapes only."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from zerotune.training.model.build import DTYPES
    config = AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[recipe.model.dtype],
                                                 trust_remote_code=recipe.model.trust_remote_code)
    return model


def write_hf_weights(tensors: dict, model, out: Path, dtype, max_shard_size: int) -> None:
    """Stream `tensors` (lazy or real) into safetensors shards named as Hugging Face names them,
    converting floats to `dtype`, one tensor in memory at a time besides the pending shard
    (export_stream.ShardWriter); drops tied copies and checks every weight is there."""
    from zerotune.training.export.stream import ShardWriter, saved_names
    wanted = saved_names(model)
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise ExportError(f"checkpoint lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}")
    writer = ShardWriter(out, max_shard_size)
    for k in wanted:
        t = materialise(tensors[k])
        writer.add(k, (t.to(dtype) if t.is_floating_point() else t).contiguous().clone())
    writer.close(total_parameters=sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- adapters
def save_adapter_folder(model, recipe, out: Path, state_dict: dict | None = None) -> None:
    """Write the adapter of a (PEFT or bottleneck-adapter) model: only its trainable weights."""
    if recipe.method.kind == "adapter":
        from zerotune.training.model.adapters import save_adapter
        save_adapter(model, out, base=base_model_id(recipe), state_dict=state_dict)
        return
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model_id(recipe)
    model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)


def adapter_model_from_checkpoint(recipe, ckpt: Path):
    """The recipe's method on a meta-device base, with the checkpoint's trainable weights in it."""
    from zerotune.training.model.build import apply_method
    model = apply_method(meta_model(recipe), recipe)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    tensors = checkpoint_tensors(ckpt, trainable_only=True)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ExportError(f"{ckpt}: no weights for {len(missing)} adapter parameter(s), e.g. {missing[:3]} "
                          f"(was this checkpoint written by a {recipe.method.kind} run?)")
    weights = {n: materialise(tensors[n]).float().clone() for n in names}
    dtypes = dict((n, p.dtype) for n, p in model.named_parameters())
    model.load_state_dict({n: w.to(dtypes[n]) for n, w in weights.items()}, strict=False, assign=True)
    return model


def load_base(recipe, dequantise: bool = True):
    """The real base model on CPU. A QLoRA base is loaded quantised as it trained, then
    dequantised to method.quant.compute_dtype, so a merge reproduces the adapter model."""
    from transformers import AutoModelForCausalLM

    from zerotune.training.model.build import DTYPES, keep_4bit_cpu_layout, quantization_config
    quant = quantization_config(recipe)
    dtype = DTYPES[recipe.method.quant.compute_dtype] if quant is not None else DTYPES[recipe.model.dtype]
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=dtype, quantization_config=quant,
                                                 trust_remote_code=recipe.model.trust_remote_code)
    keep_4bit_cpu_layout(model)
    if quant is not None and dequantise:
        model = model.dequantize(dtype=dtype)
    return model


def merge_adapter(recipe, adapter_dir: Path, out: Path, max_shard_size: int) -> None:
    from peft import PeftModel
    base = load_base(recipe)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------- the command
def _write_export(recipe, ckpt: Path, tmp: Path, merge: bool, max_shard_size: int) -> str:
    """The model or adapter of checkpoint `ckpt` into the empty folder `tmp`; returns what it is."""
    from zerotune.training.model.build import DTYPES
    kind = recipe.method.kind
    if kind == "full":
        model = meta_model(recipe)
        write_hf_weights(checkpoint_tensors(ckpt, trainable_only=False), model, tmp, DTYPES[recipe.model.dtype],
                         max_shard_size)
        model.config.save_pretrained(tmp)
        return "Hugging Face model"
    if not merge:
        save_adapter_folder(adapter_model_from_checkpoint(recipe, ckpt), recipe, tmp)
        return "bottleneck adapter" if kind == "adapter" else f"{kind} adapter"
    adapter_tmp = fresh_tmp(tmp.parent / f"{tmp.name}.adapter")
    try:
        save_adapter_folder(adapter_model_from_checkpoint(recipe, ckpt), recipe, adapter_tmp)
        merge_adapter(recipe, adapter_tmp, tmp, max_shard_size)
    finally:
        shutil.rmtree(adapter_tmp, ignore_errors=True)
    return f"base with the {kind} adapter merged"


def export_checkpoint(recipe, ckpt: Path, out: Path, merge: bool = False, max_shard_size: int = 5 * 10**9,
                      force: bool = False, run_dir: Path | None = None) -> str:
    """Write `out` from checkpoint `ckpt` of a run with `recipe`; returns what was written. An
    existing `out` must be an earlier export of the same run, or `force` (export_folder.check_out)."""
    ckpt, out = Path(ckpt), Path(out)
    if run_dir is None:
        run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS_DIR else recipe.run_dir
    check_out(out, run_dir, force)
    kind = recipe.method.kind
    if merge and kind not in MERGEABLE:
        raise ExportError(f"--merge: method.kind {kind} cannot be merged into the base weights (only "
                          f"{', '.join(MERGEABLE)} can); export the adapter without --merge and load it with "
                          f"PeftModel.from_pretrained or `zerotune generate BASE --adapter DIR`")
    tmp = fresh_tmp(out)
    try:
        what = _write_export(recipe, ckpt, tmp, merge, max_shard_size)
        save_side_files(recipe, tmp)
        finish(tmp, run_dir, ckpt.name, what)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # ours: a failed export leaves nothing behind
        raise
    return what


# ----------------------------------------------------------------------------- end of training
def save_final(engine, model, recipe, out: Path, rank: int, max_shard_size: int | None = None) -> None:
    """Every rank calls at the end of training: RUN_DIR/final as a Hugging Face folder (full)
    or an adapter folder (PEFT), with the tokenizer and its chat template. A full model is
    streamed shard by shard from the ranks (export_stream: ZeRO-3 parameters are gathered one at
    a time, all ranks taking part), so rank 0 never holds the whole model; rank 0 writes."""
    import torch.distributed as dist

    from zerotune.training.export.stream import MAX_SHARD_BYTES, stream_full_model
    from zerotune.training.model.build import DTYPES
    out = Path(out)
    tmp = fresh_tmp(out) if rank == 0 else None
    try:
        if recipe.method.kind == "full":
            stream_full_model(engine, model, tmp, rank, DTYPES[recipe.model.dtype], max_shard_size or MAX_SHARD_BYTES)
        else:
            sd = _trainable_state(engine, model, rank)
            if rank == 0:
                save_adapter_folder(model, recipe, tmp, state_dict=sd)
        if rank == 0:
            save_side_files(recipe, tmp)
            finish(tmp, out.parent, "end of training",
                   "Hugging Face model" if recipe.method.kind == "full" else f"{recipe.method.kind} adapter")
            replace_dir(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)   # a failed save leaves nothing behind; the old final stays
        raise
    dist.barrier()


def _trainable_state(engine, model, rank: int) -> dict | None:
    """The trainable (adapter) weights on CPU, on rank 0; ZeRO-3 gathers them (every rank calls)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if engine.zero_optimization_partition_weights():
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
            return {n: p.detach().cpu().clone() for n, p in trainable} if rank == 0 else None
    return {n: p.detach().cpu() for n, p in trainable}
