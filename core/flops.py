"""Parameter count and training FLOPs per token from a Hugging Face config.json dict.

Pure Python (no torch): the planner runs it on login nodes, the metrics use it for MFU.

    cfg = json.load(open("model/config.json"))
    num_params(cfg)                 # 8_030_261_248 for Llama-3-8B
    flops_per_token(cfg, 2048)      # model FLOPs of one training token (forward + backward)

Covers decoder-only transformers in the Llama / Mistral / Qwen2 / Phi-3 / Gemma family
(attention with grouped KV heads, a gated or plain MLP, RMS/LayerNorm). Mixture-of-experts
configs are counted with every expert (num_params) and the routed experts only (FLOPs).
"""
from __future__ import annotations


def _text_config(cfg: dict) -> dict:
    """Multimodal configs keep the language model under text_config."""
    return cfg.get("text_config") or cfg


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is None:
        raise KeyError(f"config.json has none of {', '.join(names)}")
    return default


def shape(cfg: dict) -> dict:
    """The sizes the formulas need, under one set of names."""
    c = _text_config(cfg)
    d = _get(c, "hidden_size", "d_model", "n_embd")
    heads = _get(c, "num_attention_heads", "n_head")
    head_dim = c.get("head_dim") or d // heads
    kv_heads = c.get("num_key_value_heads") or heads
    experts = c.get("num_local_experts") or c.get("num_experts") or 1
    # MoE: each expert's MLP width (Qwen-MoE, OLMoE: moe_intermediate_size; Mixtral: intermediate_size)
    ff = (experts > 1 and c.get("moe_intermediate_size")) or _get(c, "intermediate_size", "ffn_dim", "n_inner",
                                                                    default=4 * d)
    gated = c.get("model_type") not in ("gpt2", "gpt_neox", "opt", "phi", "falcon", "bloom")
    qkv_bias = bool(c.get("attention_bias")) or c.get("model_type") in ("qwen2", "qwen2_moe")
    active = c.get("num_experts_per_tok") or 1
    return {
        "d": d, "layers": _get(c, "num_hidden_layers", "n_layer"), "vocab": _get(c, "vocab_size"),
        "heads": heads, "head_dim": head_dim, "kv_heads": kv_heads, "ff": ff, "gated": gated,
        "qkv_bias": qkv_bias, "tied": bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        "experts": experts, "active_experts": min(active, experts),
    }


def layer_params(s: dict) -> dict:
    """Parameters of one decoder layer: attention, one expert's MLP, norms."""
    d, q, kv = s["d"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if s["qkv_bias"] else 0)
    mlp = (3 if s["gated"] else 2) * d * s["ff"]
    return {"attn": attn, "mlp": mlp, "norms": 2 * d}


def linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(in, out) of every linear layer in one decoder layer (what LoRA 'all-linear' adapts)."""
    s = shape(cfg)
    d, q, kv, ff = s["d"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["ff"]
    mlp = [(d, ff), (d, ff), (ff, d)] if s["gated"] else [(d, ff), (ff, d)]
    return [(d, q), (d, kv), (d, kv), (q, d)] + mlp * s["experts"]


def dense_linears(cfg: dict) -> list[tuple[int, int]]:
    """linear_shapes without a mixture's experts (LoRA and the FP8 base leave experts alone)."""
    return linear_shapes(cfg)[:4] if shape(cfg)["experts"] > 1 else linear_shapes(cfg)


def num_params(cfg: dict) -> int:
    """All parameters: embeddings, layers (every expert), final norm, and an untied LM head."""
    s = shape(cfg)
    lp = layer_params(s)
    layer = lp["attn"] + lp["mlp"] * s["experts"] + lp["norms"]
    if s["experts"] > 1:
        layer += s["d"] * s["experts"]  # router
    embed = s["vocab"] * s["d"]
    return embed * (1 if s["tied"] else 2) + s["layers"] * layer + s["d"]


def flops_per_token(cfg: dict, seq_len: int, frozen_base: bool = False, trainable: int = 0) -> float:
    """Training model FLOPs per token: 6 x (parameters used in matmuls) + causal attention.

    frozen_base (LoRA, QLoRA and the other adapter methods): the base's weights get no weight
    gradients, so each frozen matmul weight costs forward 2 + backward activation-gradient 2 =
    4 FLOPs a token, not 6; each `trainable` (adapter) parameter costs the full 6:
        F = 4 x N_matmul + 6 x N_adapter + 6 x L x s x h      (full: 6 x N_matmul + 6 x L x s x h)
    Attention has no weights: its term is unchanged. (The planner's speed model, calibrated on
    the 6N basis, keeps calling this without frozen_base.)

    The input embedding is a lookup (no FLOPs); a tied embedding still counts once, as the LM
    head. Attention scores and values cost 2 x 2 x layers x seq x (heads x head_dim) per token
    forward, halved by the causal mask, tripled for forward + backward: 6 x L x s x h.
    Activation recomputation is not counted (these are model FLOPs, as in MFU).
    Same formula as benchmarks/peer_hf.py (the peer), so MFUs compare.
    """
    s = shape(cfg)
    lp = layer_params(s)
    layer = lp["attn"] + lp["mlp"] * s["active_experts"] + lp["norms"]
    if s["experts"] > 1:
        layer += s["d"] * s["experts"]
    matmul = s["layers"] * layer + s["d"] + s["vocab"] * s["d"]  # LM head (tied or not)
    attention = 6 * s["layers"] * seq_len * s["heads"] * s["head_dim"]
    if frozen_base:
        return float(4 * matmul + 6 * trainable + attention)
    return float(6 * matmul + attention)


def attention_forward_share(cfg: dict, seq_len: int, frozen_base: bool = False) -> float:
    """The share of a checkpointed decoder layer's executed FLOPs (forward, recompute, backward) that
    its attention forward takes: what train.recompute_attention: false saves on it. Per token,
    a layer's n matmul weights cost 2n forward, 2n recomputed, 4n backward (2n for a frozen base);
    causal attention 2 x s x h forward (h = heads x head_dim), as much recomputed, twice that backward:
        share = 2sh / ((6 or 8) x n + 8sh)"""
    s = shape(cfg)
    lp = layer_params(s)
    n = lp["attn"] + lp["mlp"] * s["active_experts"]
    attention = 2 * seq_len * s["heads"] * s["head_dim"]
    return attention / ((6 if frozen_base else 8) * n + 4 * attention)


# Dense bf16 peak TFLOP/s of one GPU (datasheets): the planner's --gpu-type choices, and the MFU
# denominator of zerotune's metrics and of the peer (benchmarks/peer_hf.py): one table for all.
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "a10g": 125.0}
PCIE_PEAK_TFLOPS = {"h100": 756.0}   # the PCIe cards of a family, where they differ


def peak_tflops_of(device_name: str) -> float | None:
    """Peak of a GPU named as torch/nvidia-smi name it ('NVIDIA H100 PCIe', 'NVIDIA H200'); None
    when the table does not know it."""
    name = device_name.lower()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return PCIE_PEAK_TFLOPS.get(key, tflops) if "pcie" in name else tflops
    return None
