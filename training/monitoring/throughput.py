"""Throughput, MFU and GPU memory of a step.

    MFU = tokens/s x F(seq_len) / (world_size x peak FLOP/s of one GPU)

tokens/s counts the real (non-padding) tokens of the global batch over the step's wall time.
F is core/flops.py's flops_per_token(config.json, seq_len): the model FLOPs of one training
token, 6 x N_matmul + 6 x layers x seq_len x heads x head_dim for a full fine-tune, and for
LoRA/QLoRA (frozen base, no weight gradients) 4 x N_matmul + 6 x N_adapter + the same attention
term (forward 2N + activation gradients 2N; the adapters' own 6 a parameter), where N_matmul counts the
parameters used in matmuls (attention and MLP of every layer, the routed experts only for MoE,
norms, and the LM head; the input embedding is a lookup and counts nothing) and the second term
is causal attention (scores and values, forward + backward). The recomputation of gradient
checkpointing is NOT counted (model FLOPs, not hardware FLOPs), so MFU does not rise when
checkpointing is switched on. The peak is the dense bf16 figure of core/memory.py's table
(H100/H200 989 TFLOP/s, H100 PCIe 756, A100 312, ...), or ZEROTUNE_PEAK_TFLOPS; with no peak
known (a CPU, an unlisted GPU) no MFU is logged rather than a made-up one.
"""
from __future__ import annotations

import os

from zerotune.core.flops import flops_per_token
from zerotune.core.io import read_model_config
from zerotune.core.flops import peak_tflops_of
from zerotune.core.memory import Workload, lora_params

GIB = 2 ** 30   # every memory figure a user reads is in GiB (the planner's and nvidia-smi's unit)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU, from the planner's table (None when unknown).
    ZEROTUNE_PEAK_TFLOPS overrides it (for GPUs the table lacks)."""
    if os.environ.get("ZEROTUNE_PEAK_TFLOPS"):
        return float(os.environ["ZEROTUNE_PEAK_TFLOPS"]) * 1e12
    tflops = peak_tflops_of(device_name)
    return tflops * 1e12 if tflops else None


def model_flops_per_token(recipe, seq_len: int) -> float | None:
    """Training FLOPs (forward + backward) of one token, or None when we cannot know them."""
    try:
        cfg = read_model_config(recipe.model.path)
        kind, lo = recipe.method.kind, recipe.method.lora
        if kind == "full":
            return float(flops_per_token(cfg, seq_len))
        adapters = lora_params(Workload(model=cfg, lora_r=lo.r, lora_targets=lo.target_modules)) \
            if kind in ("lora", "qlora") else 0   # other adapter methods: a negligible few
        return float(flops_per_token(cfg, seq_len, frozen_base=True, trainable=adapters))
    except Exception:  # an unreadable config, an architecture flops.py does not cover
        return None


class Throughput:
    """tokens/s and MFU of a step; GPU memory of this rank."""

    def __init__(self, recipe, world_size: int, cuda: bool):
        self.recipe, self.world, self.cuda = recipe, world_size, cuda
        if cuda:
            import torch
            self.device = torch.cuda.get_device_name()
        else:
            self.device = "cpu"
        self.peak = peak_flops(self.device)
        self._flops: dict[int, float | None] = {}

    def flops_per_token(self, seq_len: int) -> float | None:
        if seq_len not in self._flops:
            self._flops[seq_len] = model_flops_per_token(self.recipe, seq_len)
        return self._flops[seq_len]

    def mfu(self, tokens_per_sec: float, seq_len: int) -> float | None:
        if self.peak is None:
            return None
        fpt = self.flops_per_token(seq_len)
        return tokens_per_sec * fpt / (self.world * self.peak) if fpt else None

    def gpu_memory(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        import torch
        return {"train/gpu_mem_allocated_gib": torch.cuda.memory_allocated() / GIB,
                "train/gpu_mem_reserved_gib": torch.cuda.memory_reserved() / GIB,
                "train/gpu_mem_peak_gib": torch.cuda.max_memory_allocated() / GIB}

    @staticmethod
    def host_memory() -> dict[str, float]:
        """This process's peak resident memory (Linux ru_maxrss, KiB), pinned host buffers included:
        offloaded activations and a background save's snapshot live there."""
        import resource
        return {"train/host_rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}

    def rates(self, tokens: float, seconds: float, padded_tokens: float | None, seq_len: int) -> dict:
        """A step's tokens/s (real tokens of the global batch, padding excluded), MFU and packing
        efficiency (real / padded tokens)."""
        tps = tokens / seconds if seconds > 0 else 0.0
        return {"train/tokens_per_sec": tps, "train/mfu": self.mfu(tps, seq_len),
                "data/packing_efficiency": tokens / padded_tokens if padded_tokens else None}


    def mfu_text(self) -> str:
        """The formula with this run's numbers (TensorBoard text config/mfu)."""
        seq = self.recipe.data.max_len
        fpt = self.flops_per_token(seq)
        peak = f"{self.peak / 1e12:g} TFLOP/s ({self.device})" if self.peak else \
            f"unknown for {self.device!r}: train/mfu is not logged (set ZEROTUNE_PEAK_TFLOPS)"
        per_token = f"{fpt:.4g} at seq_len {seq} (data.max_len; each step uses its batch's length)" if fpt else \
            "unknown (core/flops.py cannot read this model's config.json): train/mfu is not logged"
        ckpt = "on: its recomputation is not counted" if self.recipe.train.gradient_checkpointing else "off"
        return ("**train/mfu = train/tokens_per_sec x F(seq_len) / (world_size x peak FLOP/s per GPU)**\n\n"
                "F = 6 x N_matmul + 6 x layers x seq_len x heads x head_dim (full fine-tune; LoRA/QLoRA: "
                "4 x N_matmul + 6 x N_adapter + the attention term, the frozen base has no weight gradients): "
                "model FLOPs (forward + backward) "
                "of one training token (core/flops.py); N_matmul = parameters used in matmuls (attention, MLP "
                "with the routed experts only, norms, LM head; not the input embedding); the second term is "
                "causal attention. tokens/s counts real tokens, not padding, over all ranks.\n\n"
                f"- F: {per_token}\n- peak: {peak}, dense bf16\n- world_size: {self.world}\n"
                f"- gradient checkpointing {ckpt} (model FLOPs, not hardware FLOPs)")


# Memory keys before 2026-12 were named _gb and held 1e9-byte GB; metrics.jsonl keeps them for one
# release (scripts that read them), the trackers show only the GiB keys.
OLD_MEMORY_KEYS = {f"train/gpu_mem_{k}_gib": (f"train/gpu_mem_{k}_gb", GIB / 1e9) for k in ("allocated", "reserved", "peak")}


def with_old_memory_keys(values: dict) -> dict:
    out = dict(values)
    for new, (old, scale) in OLD_MEMORY_KEYS.items():
        if values.get(new) is not None:
            out[old] = values[new] * scale
    return out
