"""Memory options for long sequences, after DeepSpeed's ALST work (TiledMLP, offloaded
checkpoints), for any world size and with or without sequence parallelism:

train.tiled_mlp: each decoder layer's MLP runs over the sequence in tiles, in the forward and
    again in the backward (recomputed tile by tile), so its intermediate activations (gate, up,
    act(gate), their product: 4 x intermediate_size values per token) exist for one tile at a
    time instead of for every token. An MLP works on each token alone, so tiling changes no
    value. The number of tiles is fixed for the run (tiles_for): every rank then calls the MLP's
    linears equally often, which ZeRO-3 needs (it gathers a layer's parameters on each call; a
    rank with fewer calls would leave the others waiting). Gradients of the MLP's parameters
    are summed over the tiles before DeepSpeed reduces them (ds_grad_is_ready, which ZeRO 1-3
    read, stays False until the last tile).
train.gradient_checkpointing: N (checkpoint_first): only the first N decoder layers are
    checkpointed (recomputed in the backward); the later ones keep their activations. The
    earliest layers are the ones to checkpoint: the backward reaches them last, after the
    uncheckpointed layers' activations are freed, so a recompute never holds memory beside
    those, and an offloaded input has the most time to travel (core/memory.py counts it so).
train.offload_activations: N (HostCheckpoints): a checkpointed layer keeps only its input for the
    recompute; for the first N checkpointed layers that input waits in pinned CPU memory. The
    forward copies it out on a side CUDA stream (the layer runs on the input as it is meanwhile);
    the checkpoint holds only the CPU copy. When the backward reaches the layer after it, the copy
    back to the GPU starts on the side stream (a hook on that layer's output gradient), so it is
    there when the layer's recompute starts; the recompute waits on its event. Gradients flow
    through the forward's own graph (non-reentrant checkpointing), so the copies carry none. On
    a CPU the same code runs with plain copies and no streams.

train.recompute_attention: false (attention_kept): a checkpointed layer keeps the attention kernel's
    outputs (its output, n x hidden_size, and the softmax statistics) through PyTorch's selective
    activation checkpointing, so the backward's recompute runs the layer without attention, which at
    long sequences is most of its time; every other op is recomputed as before.

    checkpoint_first(model, recipe)   # in build_model, after the model's checkpointing is on
    enable(model, recipe)             # after build_model; before the DeepSpeed engine
"""
from __future__ import annotations

import math

import torch

from zerotune.core.layers import offloaded_layers
from zerotune.core.long_context import layer_options
from zerotune.core.recipe import RecipeError


def tiles_for(recipe, hidden_size: int) -> int:
    """Tiles of about hidden_size tokens over the longest sequence one GPU holds (ALST's choice:
    a tile's intermediate is then ~4 x intermediate_size x hidden_size values)."""
    return max(1, math.ceil(recipe.tokens_per_gpu() / hidden_size))


def decoder_layers(model, setting: str | None = None):
    """The model's decoder layers (model.model.layers, through a PEFT wrapper). A family without
    them: None, or, where `setting` needs them, a RecipeError naming that setting."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None and setting:
        raise RecipeError(f"{setting}: {type(lm).__name__} has no model.layers (a family zerotune does not "
                          "know the layers of)")
    return layers


options = layer_options   # what the log says and compile leaves alone (core/long_context.py)


# the fused attention kernels sdpa dispatches to (and flash-attn's registered op): what attention_kept keeps
ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_flash_attn_forward", "_flash_attn_varlen_forward")


def checkpoint_kwargs(train) -> dict:
    """torch.utils.checkpoint's arguments for the model's checkpointed layers: non-reentrant (the
    per-layer choice and offloaded inputs need it), with attention_kept when train.recompute_attention is
    false (auto, in a recipe the launcher did not resolve: recomputed)."""
    return {"use_reentrant": False, **({"context_fn": attention_kept} if train.recompute_attention is False else {})}


def attention_kept():
    """A checkpoint's context_fn (torch.utils.checkpoint, non-reentrant): the attention kernels'
    outputs are saved in the forward, everything else is recomputed in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        name = getattr(op, "__name__", str(op)).split(".")[0]
        return CheckpointPolicy.MUST_SAVE if name in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def checkpoint_first(model, recipe) -> int:
    """train.gradient_checkpointing: N -> only the first N decoder layers stay checkpointed (the
    model's own switch, transformers' GradientCheckpointingLayer.gradient_checkpointing, turned
    off on the others); true / auto: all, untouched. Returns how many are checkpointed."""
    g = recipe.train.gradient_checkpointing
    if type(g) is not int:
        return -1 if g else 0
    layers = decoder_layers(model, f"train.gradient_checkpointing: {g}")
    for i, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise RecipeError(f"train.gradient_checkpointing: {g}: layer {i} of {type(model).__name__} has no "
                              "per-layer checkpointing switch (use true or false)")
        layer.gradient_checkpointing = i < g
    return min(g, len(layers))


def enable(model, recipe) -> list[str]:
    """Apply the recipe's long-sequence options to `model`; returns what was turned on."""
    on = []
    if recipe.uses_tiled_mlp():
        layers = decoder_layers(model, "train.tiled_mlp")
        tiles = tiles_for(recipe, model.config.get_text_config().hidden_size)
        for i, layer in enumerate(layers):
            if not isinstance(getattr(layer, "mlp", None), torch.nn.Module):
                raise RecipeError(f"train.tiled_mlp: layer {i} of {type(model).__name__} has no .mlp module")
            tile_mlp(layer.mlp, tiles)
        on.append(f"tiled MLP ({tiles} tiles)")
    if recipe.train.offload_activations not in (False, 0, "auto"):
        layers = decoder_layers(model, "train.offload_activations")
        count = offloaded_layers(recipe.train, len(layers))
        for layer in layers[:count]:
            if not getattr(layer, "gradient_checkpointing", False) or not hasattr(layer, "_gradient_checkpointing_func"):
                raise RecipeError("train.offload_activations: the model's layers are not checkpointed "
                                  "(train.gradient_checkpointing must be on)")
        HostCheckpoints(layers, count)
        on.append(f"checkpointed activations of {count} of {len(layers)} layers offloaded to CPU")
    return on


# ----------------------------------------------------------------------------- tiled MLP
def tile_mlp(mlp: torch.nn.Module, tiles: int) -> None:
    plain = mlp.forward
    mlp.forward = lambda x: TiledMLP.apply(x, plain, tiles, mlp)


class TiledMLP(torch.autograd.Function):
    """y = mlp(x), computed `tiles` pieces of the sequence (dim -2) at a time, keeping only x."""

    @staticmethod
    def forward(ctx, x, plain, tiles, mlp):
        ctx.plain, ctx.tiles, ctx.mlp = plain, tiles, mlp
        ctx.rng = rng_state(x.device)   # dropout (LoRA's) draws the same masks in the backward's recompute
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([plain(part) for part in x.tensor_split(tiles, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.mlp.parameters() if p.requires_grad]
        x_grad = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        start = 0
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            set_rng_state(ctx.rng, x.device)
            for i, (part, g) in enumerate(zip(x.tensor_split(ctx.tiles, dim=-2), grad.tensor_split(ctx.tiles, dim=-2))):
                for p in params:   # DeepSpeed reduces a gradient when it is ready: after the last tile
                    p.ds_grad_is_ready = i == ctx.tiles - 1
                part = part.detach().requires_grad_(x_grad is not None)
                with torch.enable_grad():
                    out = ctx.plain(part)
                if out.requires_grad:
                    torch.autograd.backward(out, g)
                if x_grad is not None:
                    x_grad.narrow(-2, start, part.shape[-2]).copy_(part.grad)
                start += part.shape[-2]
        return x_grad, None, None, None


def rng_state(device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ----------------------------------------------------------------------------- offloaded checkpoints
class HostCheckpoints:
    """The first `count` layers' checkpointed inputs in (pinned) CPU memory, each prefetched to the
    device when the backward reaches the layer after it (module docstring)."""

    def __init__(self, layers, count: int):
        self.host: dict = {}     # layer index -> (CPU copy, event after which it is complete or None)
        self.ready: dict = {}    # layer index -> (device copy, event after which it is there or None)
        self.streams: dict = {}  # device -> the side stream of the copies
        for i in range(count):
            layers[i]._gradient_checkpointing_func = self.wrap(i, layers[i]._gradient_checkpointing_func)
            after = layers[i + 1] if i + 1 < len(layers) else layers[i]   # its backward comes just before i's
            after.register_forward_hook(self.arm(i))

    def stream(self, device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def store(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """The CPU copy of layer i's input, started (CUDA: on the side stream, into pinned memory)."""
        host = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=hidden.is_cuda)
        event = None
        if hidden.is_cuda:
            side = self.stream(hidden.device)
            side.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(side):
                host.copy_(hidden.detach(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            hidden.record_stream(side)   # not reused before the copy is done
        else:
            host.copy_(hidden.detach())
        self.host[i] = (host, event)
        return host

    def to_device(self, i: int, device) -> tuple:
        host, event = self.host.pop(i)
        if device.type != "cuda":
            return torch.empty(host.shape, dtype=host.dtype, device=device).copy_(host), None
        side = self.stream(device)
        with torch.cuda.stream(side):
            side.wait_event(event)
            out = torch.empty(host.shape, dtype=host.dtype, device=device)
            out.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    def prefetch(self, i: int, device) -> None:
        if i in self.host and i not in self.ready:
            self.ready[i] = self.to_device(i, device)

    def take(self, i: int, device) -> torch.Tensor:
        out, done = self.ready.pop(i) if i in self.ready else self.to_device(i, device)
        if done is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            out.record_stream(current)
        return out

    def arm(self, i: int):
        """A forward hook on the layer after i: the gradient of its output starts i's prefetch."""
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad and i in self.host:
                device = out.device
                out.register_hook(lambda grad: self.prefetch(i, device))
        return hook

    def wrap(self, i: int, checkpoint_fn):
        """Layer i's checkpoint function: the forward runs on the input as it is and starts its CPU
        copy; the checkpoint holds the CPU copy; the recompute takes the prefetched device copy."""
        def run(fn, *args, **kwargs):
            if not args or not isinstance(args[0], torch.Tensor):   # hidden states passed by keyword: kept
                return checkpoint_fn(fn, *args, **kwargs)
            hidden, rest = args[0], args[1:]
            device, needs_grad, first = hidden.device, hidden.requires_grad, [hidden]
            host = self.store(i, hidden)

            def layer(h, *a, **k):
                if first:      # the forward itself
                    return fn(first.pop(), *a, **k)
                return fn(self.take(i, device).requires_grad_(needs_grad), *a, **k)
            return checkpoint_fn(layer, host, *rest, **kwargs)
        return run
