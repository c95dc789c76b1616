"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), which peft does not have.

Each adapter is a small residual MLP  h -> h + up(act(down(h)))  applied to the output of a
decoder layer's attention block (houlsby only) and MLP block (houlsby and pfeiffer), before
the layer's own residual add. `up` starts at zero, so training starts at the base model.

    model = add_adapters(model, recipe.method.adapter)         # freezes the base
    save_adapter(model, "out/", cfg, base="meta-llama/...")     # zerotune_adapter.json + safetensors
    load_adapter(model, "out/", name="math"); set_active(model, "math")

Adapters are child modules `<block>.bottleneck_adapters[<name>]` (so they live in the model's
state dict and DeepSpeed sees them) run by a forward hook on the block.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "zerotune_adapter.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT = "default"


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, dropout: float, dtype=None):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(self.act(self.down(h))))


def _hook(block, args, output):
    name = getattr(block, "active_bottleneck", None)
    if name is None:
        return output
    adapter = block.bottleneck_adapters[name]
    if isinstance(output, tuple):  # attention returns (hidden, weights, ...)
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def _blocks(model, placement: str) -> list[nn.Module]:
    """The attention and/or MLP blocks of every decoder layer."""
    layers = [m for m in model.modules() if hasattr(m, "mlp") and (hasattr(m, "self_attn") or hasattr(m, "attn"))]
    if not layers:
        raise ValueError(f"method.kind adapter: no decoder layers with self_attn/mlp blocks found in "
                         f"{type(model).__name__}")
    names = ("self_attn", "mlp") if placement == "houlsby" else ("mlp",)
    out = []
    for layer in layers:
        for n in names:
            if n == "self_attn" and not hasattr(layer, "self_attn"):
                n = "attn"
            out.append(getattr(layer, n))
    return out


def _hidden_size(model) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size


def add_adapters(model, cfg, name: str = DEFAULT, freeze_base: bool = True):
    """Insert adapters named `name` (cfg: training.config.AdapterConfig) and make them active."""
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    hidden = _hidden_size(model)
    for block in _blocks(model, cfg.placement):
        dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), None)
        if not hasattr(block, "bottleneck_adapters"):
            block.bottleneck_adapters = nn.ModuleDict()
            block.register_forward_hook(_hook)
        device = next(block.parameters()).device
        block.bottleneck_adapters[name] = Bottleneck(hidden, cfg.bottleneck, cfg.dropout, dtype=dtype).to(device)
        block.active_bottleneck = name
    model.zerotune_adapter_config = {**cfg.model_dump(), "hidden_size": hidden}
    return model


def set_active(model, name: str | None) -> None:
    """Run adapter `name` in every block (None: the base model alone)."""
    for block in model.modules():
        if hasattr(block, "bottleneck_adapters"):
            if name is not None and name not in block.bottleneck_adapters:
                raise KeyError(f"no bottleneck adapter named {name!r} (have: {', '.join(block.bottleneck_adapters)})")
            block.active_bottleneck = name


def adapter_state_dict(model, name: str = DEFAULT, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights with the name taken out of the keys (the on-disk form)."""
    sd = state_dict if state_dict is not None else model.state_dict()
    mark = f".bottleneck_adapters.{name}."
    return {k.replace(mark, ".bottleneck_adapters."): v for k, v in sd.items() if mark in k}


def save_adapter(model, out: str | Path, base: str, name: str = DEFAULT, state_dict: dict | None = None) -> None:
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model, name, state_dict).items()}
    save_file(weights, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"kind": "bottleneck", "base_model_name_or_path": base, **model.zerotune_adapter_config}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / CONFIG_NAME).read_text())


def load_adapter(model, path: str | Path, name: str = DEFAULT):
    """Add the adapter saved in `path` to `model` under `name` and make it active."""
    from safetensors.torch import load_file

    from zerotune.core.recipe import AdapterConfig
    cfg = read_config(path)
    add_adapters(model, AdapterConfig(bottleneck=cfg["bottleneck"], placement=cfg["placement"],
                                      dropout=cfg["dropout"]), name=name, freeze_base=False)
    weights = load_file(str(Path(path) / WEIGHTS_NAME))
    mark = f".bottleneck_adapters.{name}."
    weights = {k.replace(".bottleneck_adapters.", mark): v for k, v in weights.items()}
    missing = set(adapter_state_dict(model, name, {k: None for k in model.state_dict()}))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapter weights do not fit this model: {result.unexpected_keys[:3]} ...")
    not_loaded = [k for k in result.missing_keys if mark in k]
    if not_loaded or len(weights) != len(missing):
        raise ValueError(f"{path}: adapter weights missing for {not_loaded[:3]} ...")
    return model
