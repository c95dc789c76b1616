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
train.offload_activations: with gradient checkpointing a layer keeps only its input for the
    recompute; here that input is held in CPU memory and copied back when the layer's backward
    recomputes it. The checkpoint is given the CPU copy, and the copy to the GPU happens inside
    the checkpointed function, so nothing of the layer stays on the GPU between its forward and
    its backward (the copy's backward brings the gradient back to the GPU).

    enable(model, recipe)        # after build_model; before the DeepSpeed engine
"""
from __future__ import annotations

import math

import torch

from zerotune.core.recipe import RecipeError


def tiles_for(recipe, hidden_size: int) -> int:
    """Tiles of about hidden_size tokens over the longest sequence one GPU holds (ALST's choice:
    a tile's intermediate is then ~4 x intermediate_size x hidden_size values)."""
    return max(1, math.ceil(recipe.tokens_per_gpu() / hidden_size))


def decoder_layers(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise RecipeError(f"train.tiled_mlp / train.offload_activations: {type(lm).__name__} has no model.layers")
    return layers


def options(recipe) -> list[str]:
    """What makes a layer more than plain compute in this run (the log says it; compile leaves
    such layers alone): sequence parallelism and the two options here."""
    sp = recipe.distributed.sequence_parallel
    return ([f"sequence parallel {sp}"] if sp > 1 else []) + \
        (["tiled MLP"] if recipe.uses_tiled_mlp() else []) + \
        (["checkpointed activations on CPU"] if recipe.train.offload_activations is True else [])


def enable(model, recipe) -> list[str]:
    """Apply the recipe's long-sequence options to `model`; returns what was turned on."""
    on = []
    if recipe.uses_tiled_mlp():
        layers = decoder_layers(model)
        tiles = tiles_for(recipe, model.config.get_text_config().hidden_size)
        for i, layer in enumerate(layers):
            if not isinstance(getattr(layer, "mlp", None), torch.nn.Module):
                raise RecipeError(f"train.tiled_mlp: layer {i} of {type(model).__name__} has no .mlp module")
            tile_mlp(layer.mlp, tiles)
        on.append(f"tiled MLP ({tiles} tiles)")
    if recipe.train.offload_activations is True:
        for layer in decoder_layers(model):
            if not hasattr(layer, "_gradient_checkpointing_func"):
                raise RecipeError("train.offload_activations: the model's layers are not checkpointed "
                                  "(train.gradient_checkpointing must be on)")
            layer._gradient_checkpointing_func = offloaded(layer._gradient_checkpointing_func)
        on.append("checkpointed activations offloaded to CPU")
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
def offloaded(checkpoint_fn):
    """A layer's checkpoint function that keeps the layer's input (hidden states, the first
    argument transformers passes) in CPU memory: the checkpoint holds the CPU copy and the
    function it recomputes starts by copying it back."""
    def run(fn, *args, **kwargs):
        if not args or not isinstance(args[0], torch.Tensor):   # hidden states passed by keyword: as before
            return checkpoint_fn(fn, *args, **kwargs)
        hidden, rest = args[0], args[1:]
        device = hidden.device

        def layer(h, *a, **k):
            return fn(h.to(device, non_blocking=True), *a, **k)
        return checkpoint_fn(layer, hidden.to("cpu"), *rest, **kwargs)
    return run
