"""The planner's bytes per token of one decoder layer's saved activations (core/memory.py
layer_working_bytes: what a layer keeps for its backward, and what a checkpointed layer's
recompute holds) against the truth: every tensor autograd saves in the forward of a real Llama
layer (torch.autograd.graph.saved_tensors_hooks), counted once per storage, parameters, the
layer's input (the checkpoint, counted apart) and RoPE's cos/sin left out. bf16 on CPU, where
sdpa's flash kernel saves what the GPU's does (q, k, v, out, logsumexp); a dropout mask, which
the CPU keeps in the input's dtype, counts 1 byte an element, as CUDA's boolean one. The estimate must not
be below the truth (an OOM the plan said would fit) nor far above it (a sequence refused that
fits: at 8B and 512K tokens each 1 KB a token is 0.5 GiB)."""
from __future__ import annotations

import pytest
import torch

from zerotune.core.memory import Workload, layer_working_bytes

D, FF, HEADS, KV_HEADS, SEQ = 512, 1792, 8, 2, 1024   # Llama-3 8B's ratios: ff 3.5 d, 4 query heads a KV head


def llama_layer_model(lora_dropout: float | None, adapter_dtype=torch.bfloat16, fused: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=1, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if lora_dropout is None:
        return model, config
    from peft import LoraConfig, get_peft_model
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout,
                                            target_modules="all-linear"))
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(adapter_dtype)
    if fused:
        from zerotune.training.model.lora_fused import fuse
        assert fuse(peft)["dropout"] == 7
    return peft.base_model.model, config


def is_dropout_mask(t: torch.Tensor, p: float) -> bool:
    return (p > 0 and t.grad_fn is None and not t.requires_grad and t.is_floating_point() and t.dim() > 1
            and bool(((t == 0) | (t == torch.tensor(1 / (1 - p), dtype=t.dtype))).all()))


def saved_bytes_per_token(model, tiled: bool, dropout: float = 0.0) -> float:
    from zerotune.training.model.long_sequence import tile_mlp
    layer = model.model.layers[0]
    if tiled:
        tile_mlp(layer.mlp, tiles=4)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(1, SEQ, D, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(SEQ)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    left_out = params | {t.untyped_storage().data_ptr() for t in (x, cos, sin)}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in left_out:
            saved[storage.data_ptr()] = t.numel() if is_dropout_mask(t, dropout) else storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()   # what was saved is what the backward uses
    return sum(saved.values()) / SEQ


CASES = {   # name: (LoRA dropout or None for a full fine-tune, adapters' dtype, trainer, tiled MLP, fused dropout)
    "full": (None, torch.bfloat16, "zerotune", False),
    "full-tiled": (None, torch.bfloat16, "zerotune", True),
    "lora-dropout": (0.05, torch.bfloat16, "zerotune", False),
    "lora-no-dropout": (0.0, torch.bfloat16, "zerotune", False),
    "lora-no-dropout-tiled": (0.0, torch.bfloat16, "zerotune", True),
    "lora-dropout-tiled": (0.05, torch.bfloat16, "zerotune", True),
    "lora-fp32-adapters": (0.0, torch.float32, "hf-trainer", False),   # the HF peer: each linear's input cast
    "lora-dropout-fused": (0.05, torch.bfloat16, "zerotune", False, True),
    "lora-dropout-fused-tiled": (0.05, torch.bfloat16, "zerotune", True, True),
}


@pytest.mark.parametrize("case", CASES)
def test_planned_layer_bytes_cover_the_saved_tensors_and_stay_close(case):
    dropout, adapter_dtype, trainer, tiled, *fused = CASES[case]
    fused = bool(fused and fused[0])
    model, config = llama_layer_model(dropout, adapter_dtype, fused)
    measured = saved_bytes_per_token(model, tiled, dropout or 0.0)
    w = Workload(model=config.to_dict(), lora_r=16, lora_dropout=dropout or 0.0, trainer=trainer, lora_dropout_fused=fused)
    planned = layer_working_bytes(w, "full" if dropout is None else "lora", act=2, tiled=tiled)
    assert measured <= planned <= 1.15 * measured, f"{case}: planned {planned:,.0f} B a token, saved {measured:,.0f}"


def test_what_lora_keeps_beside_a_full_fine_tune_with_and_without_dropout():
    """Without dropout peft's lora_A gets the very tensor the frozen linear got (nn.Identity), so
    LoRA keeps what a full fine-tune keeps, less the norms' bf16 inputs their frozen weights need
    no gradient from (2 norms x d), plus lora_A's r outputs. With dropout each adapted linear keeps
    its own dropped-out input (bf16) and mask (1 byte), and the inputs only the linears kept (both
    norms' outputs, act(gate) * up) are gone. The planner counted dropout's copies for both until
    2026-12-06: 38,912 x 2 bytes a token too many at 8B without dropout, 19 GiB a layer at 512K."""
    full = saved_bytes_per_token(llama_layer_model(None)[0], tiled=False)
    plain = saved_bytes_per_token(llama_layer_model(0.0)[0], tiled=False)
    dropped = saved_bytes_per_token(llama_layer_model(0.05)[0], tiled=False, dropout=0.05)
    adapted, inputs = 7, 6 * D + FF   # q, k, v, o, gate, up take d features a token, down ff
    assert plain == full - 2 * 2 * D + adapted * 16 * 2
    assert dropped == plain + 3 * inputs - 2 * (2 * D + FF)
    # zerotune's (training/model/lora_fused.py) keeps what LoRA without dropout keeps
    assert saved_bytes_per_token(llama_layer_model(0.05, fused=True)[0], tiled=False, dropout=0.05) == plain
