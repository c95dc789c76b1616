"""RUN_DIR/final written shard by shard from the ranks (issue 13): rank 0's host memory stays
at about one shard plus the largest tensor, never the whole 16-bit model (~140 GB at 70B).

    names = saved_names(model)                         # state-dict order, tied copies left out
    for name, tensor in gathered(engine, model, names, rank):   # every rank: one collective each
        writer.add(name, tensor)                       # rank 0: a full shard goes to disk and is freed
    writer.close(total_parameters)                     # final names + model.safetensors.index.json

The files are those save_pretrained writes: model.safetensors, or model-0000i-of-0000N.safetensors
and model.safetensors.index.json; tied weights (lm_head = embed_tokens) are saved once, under
the name save_pretrained keeps. `zerotune export` (training/export/write.py) writes its shards with
the same ShardWriter.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MAX_SHARD_BYTES = 5 * 10**9   # as `zerotune export --max-shard-size` (save_pretrained's own default is 50GB)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ShardWriter:
    """Tensors in, safetensors shards out: a shard is written as soon as the next tensor would
    take it past `max_shard_size` (a larger tensor gets a shard of its own, as in
    huggingface_hub's split_torch_state_dict_into_shards) and is then dropped from memory."""

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder, self.max_shard_size = Path(folder), max_shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []   # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.total_bytes += nbytes
        if nbytes > self.max_shard_size:   # its own shard, numbered before the pending one (as the hub does)
            self._write({name: tensor})
            return
        if self.pending and self.pending_bytes + nbytes > self.max_shard_size:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
        self.pending, self.pending_bytes = {}, 0

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        # the final name holds the shard count, known at close(): a temporary name until then
        name = f".shard-{len(self.written) + 1:05d}.safetensors.tmp"
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        self.written.append((name, list(tensors)))

    def close(self, total_parameters: int | None = None) -> dict[str, str]:
        """Write the last shard, give every shard its final name and (for several) the index;
        returns tensor name -> file name."""
        self.flush()
        n = len(self.written)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, keys), name in zip(self.written, names):
            os.replace(self.folder / tmp, self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            metadata = {"total_size": self.total_bytes}
            if total_parameters is not None:
                metadata = {"total_parameters": total_parameters, **metadata}
            index = {"metadata": metadata, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map


def saved_names(model) -> list[str]:
    """The state-dict names save_pretrained would write, in order: `_keys_to_ignore_on_save` and
    tied copies dropped by transformers' own rule (remove_tied_weights_from_state_dict), applied
    to one small stand-in tensor per distinct parameter, so nothing is gathered or copied."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    state = model.state_dict(keep_vars=True)   # tied names share one Parameter object...
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    stand_in, by_object = {}, {}
    for name, t in state.items():
        if name not in ignore:
            stand_in[name] = by_object.setdefault(id(t), torch.empty(1))
    # ...except on a meta-device model (init_empty_weights does not tie): the declared ties then
    if model.config.get_text_config().tie_word_embeddings:
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            if target in stand_in and source in stand_in:
                stand_in[target] = stand_in[source]
    kept = remove_tied_weights_from_state_dict(stand_in, model)
    return [n for n in state if n in kept]


def gathered(engine, model, names: list[str], rank: int, dtype: torch.dtype):
    """(name, CPU tensor in `dtype` on rank 0, None elsewhere) for each of `names`, in order.
    Every rank must iterate to the end: a ZeRO-3 parameter is gathered with a collective
    (deepspeed.zero.GatheredParameters, one parameter at a time, so device memory holds one full
    parameter at most); rank 0 copies it to CPU before it is partitioned again."""
    state = model.state_dict(keep_vars=True)
    zero3 = engine.zero_optimization_partition_weights()
    for name in names:
        t = state[name]
        if zero3 and hasattr(t, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([t]):
                yield name, (_cpu_copy(t, dtype) if rank == 0 else None)
        else:   # a ZeRO 0-2 parameter, or a buffer: every rank holds it whole
            yield name, (_cpu_copy(t, dtype) if rank == 0 else None)


def _cpu_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of its own (never a view into DeepSpeed's gather buffer), floats in `dtype`."""
    t = t.detach()
    return t.to("cpu", dtype=dtype if t.is_floating_point() else t.dtype, copy=True).contiguous()


def save_config(model, folder: Path, dtype: torch.dtype) -> None:
    """config.json (and generation_config.json, remote code) as save_pretrained writes them."""
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save
        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


def stream_full_model(engine, model, folder: Path | None, rank: int, dtype: torch.dtype,
                      max_shard_size: int = MAX_SHARD_BYTES) -> None:
    """Every rank calls; rank 0 writes the model's weights and config into `folder` (None on the
    other ranks). A failure on rank 0 while writing does not leave the others waiting in a gather:
    rank 0 stops writing, keeps gathering to the end, and every rank raises it afterwards."""
    import torch.distributed as dist
    writer = ShardWriter(folder, max_shard_size) if rank == 0 else None
    error, parameters = None, 0
    for name, tensor in gathered(engine, model, saved_names(model), rank, dtype):
        if rank != 0 or error is not None:
            continue
        try:
            writer.add(name, tensor)
            parameters += tensor.numel() if isinstance(_owner(model, name), torch.nn.Parameter) else 0
        except Exception as e:   # noqa: BLE001  (raised below, on every rank)
            error = e
    if rank == 0 and error is None:
        try:
            writer.close(total_parameters=parameters)
            save_config(model, folder, dtype)
        except Exception as e:   # noqa: BLE001
            error = e
    failed = [repr(error) if error is not None else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0] is not None:
        raise RuntimeError(f"rank 0 failed to write the final model: {failed[0]}")


def _owner(model, name: str):
    """The Parameter or buffer object behind state-dict entry `name`."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return module._parameters.get(leaf, module._buffers.get(leaf))
