"""One row of the planner (launcher/plan.py): what a strategy needs, its speed, and what the planner
chose by the layer (core/memory.py's docstring). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Estimate:
    strategy: object            # core.memory.Strategy
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
    fused_loss: bool = False    # the chunked loss (set by the launcher's auto choice)
    offload_activations: bool = False   # checkpointed layer inputs in CPU memory (idem)
    hours: Optional[float] = None
    gpu_hours: Optional[float] = None
    cost: Optional[float] = None
    why_not: str = ""
    layers: int = 0             # decoder layers of the model
    ckpt_layers: int = 0        # of them checkpointed (the first ones; launcher/plan.py fit_layers)
    offload_layers: int = 0     # of those, inputs kept in CPU memory (the first ones)
    tiled_mlp: bool = False
    kept_attention: bool = False   # checkpointed layers keep attention's output (train.recompute_attention: false)

    @property
    def label(self) -> str:
        """The strategy's label with what the planner chose by the layer."""
        text = self.strategy.label
        if 0 < self.ckpt_layers < self.layers:
            text = text.replace("ckpt on", f"ckpt {self.ckpt_layers}/{self.layers}")
        return text + (f" +offload {self.offload_layers} act" if self.offload_layers else "") + \
            (" +tiled MLP" if self.tiled_mlp else "") + (" +attention kept" if self.kept_attention and self.ckpt_layers else "")

    def settings(self) -> dict:
        """The recipe values (train.*) this estimate runs with: gradient_checkpointing true / false / N,
        offload_activations true / false / N, tiled_mlp, recompute_attention."""
        k, o = self.ckpt_layers, self.offload_layers
        return {"gradient_checkpointing": k if 0 < k < self.layers else k > 0,
                "offload_activations": o if 0 < o < k else o > 0, "tiled_mlp": self.tiled_mlp,
                "recompute_attention": not self.kept_attention}

    def overrides(self) -> list[str]:
        """--set KEY=VALUE of the strategy and settings() (recompute_attention only when false)."""
        return [o for o in self.strategy.overrides() if not o.startswith("train.gradient_checkpointing=")] + \
            [f"train.{k}={str(v).lower()}" for k, v in self.settings().items() if k != "recompute_attention" or not v]
