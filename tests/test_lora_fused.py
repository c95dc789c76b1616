"""training/model/lora_fused.py: LoRA's dropout drawn again in the backward instead of kept, and
lora_B's output added inside its GEMM.

The fused adapters must compute what peft's do (the same masks, so the same loss and gradients up
to the fused add's single rounding; bit for bit with the dropout alone), leave the random stream
where peft leaves it, survive gradient checkpointing's recompute, keep peft's parameter names,
merges and disabled-adapter path, and keep less: the memory itself is checked against the planner
in tests/test_layer_bytes.py. A GPU case (marked gpu) checks CUDA's fused dropout kernel."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import base_recipe
from zerotune.training.model.lora_fused import DroppedLoraA, _fused_linear_class, fuse


def tiny_lora(dropout: float = 0.1, dtype=torch.float32, use_dora: bool = False, device: str = "cpu"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device, dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             use_dora=use_dora))
    for name, p in model.named_parameters():   # lora_B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def step(model, ids: torch.Tensor, seed: int = 1) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """One forward and backward from `seed`: (loss, the adapters' gradients, the next random draw)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, torch.rand(4, device=ids.device)


def ids(device="cpu"):
    return torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3)).to(device)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("zero3", [False, True])   # ZeRO-3: the dropout alone (lora_B's forward gathers it)
def test_fused_adapters_compute_what_peft_computes(checkpointing, zero3):
    plain = tiny_lora()
    fused = copy.deepcopy(plain)
    assert fuse(fused, zero3=zero3) == {"dropout": 2 * 7, "output": 0 if zero3 else 2 * 7}   # 7 linears a layer
    for model in (plain, fused):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    batch = ids()
    loss, grads, after = step(plain, batch)
    fused_loss, fused_grads, fused_after = step(fused, batch)
    exact = {"rtol": 0, "atol": 0} if zero3 else {"rtol": 1e-5, "atol": 1e-7}
    assert fused_loss == pytest.approx(loss, rel=exact["rtol"] or 1e-6, abs=0)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, **exact, msg=name)
    assert torch.equal(after, fused_after), "the random stream after the step differs from peft's"
    # dropout really acts: another seed draws other masks, so other gradients
    other = step(fused, batch, seed=2)[1]
    assert any(not torch.equal(other[n], fused_grads[n]) for n in grads)


def test_eval_no_grad_disabled_adapters_names_and_merges_stay_peft_s():
    plain = tiny_lora()
    fused = copy.deepcopy(plain)
    fuse(fused)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert plain.state_dict().keys() == fused.state_dict().keys()
    batch = ids()
    for model in (plain, fused):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=batch).logits, plain(input_ids=batch).logits, rtol=0, atol=0)
        fused.train()   # training without gradients (TiledMLP's forward): F.dropout's own draws
        plain.train()
        torch.manual_seed(5)
        a = fused(input_ids=batch).logits
        torch.manual_seed(5)
        torch.testing.assert_close(a, plain(input_ids=batch).logits)
    with torch.no_grad(), fused.disable_adapter(), plain.disable_adapter():   # peft's own path: the base alone
        torch.testing.assert_close(fused(input_ids=batch).logits, plain(input_ids=batch).logits, rtol=0, atol=0)
    merged, merged_plain = fused.merge_and_unload(), plain.merge_and_unload()
    merged.eval(), merged_plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch).logits, merged_plain(input_ids=batch).logits)


def test_only_vanilla_lora_with_dropout_is_fused():
    assert fuse(tiny_lora(dropout=0.0))["dropout"] == 0          # nn.Identity keeps nothing
    assert fuse(tiny_lora(use_dora=True))["dropout"] == 0        # DoRA's magnitude uses the dropped input too
    model = tiny_lora()
    assert fuse(model) == {"dropout": 14, "output": 14} and fuse(model) == {"dropout": 0, "output": 0}   # twice: no change
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is _fused_linear_class()
    assert isinstance(layer.lora_A["default"], DroppedLoraA) and layer.lora_A["default"].p == 0.1
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)


def test_build_model_fuses_unless_the_layers_compile(tmp_path):
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.model.build import build_model

    def fused_count(**train):
        recipe = validate_recipe(base_recipe(tmp_path, method={"kind": "lora", "lora": {"dropout": 0.05}},
                                             distributed={"zero": 0}, train=train))
        modules = list(build_model(recipe, {}).modules())
        return sum(isinstance(m, (DroppedLoraA, _fused_linear_class())) for m in modules)

    assert fused_count(compile=False) > 0
    assert fused_count(compile=True) == 0   # inductor draws its own dropout in compiled layers


def test_planner_counts_the_fused_dropout_like_none():
    from zerotune.core.memory import Workload, layer_working_bytes
    llama_8b = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, hidden_act="silu", model_type="llama")
    plain = layer_working_bytes(Workload(model=llama_8b, lora_dropout=0.0), "lora", 2)
    kept = layer_working_bytes(Workload(model=llama_8b, lora_dropout=0.05), "lora", 2)
    fused = layer_working_bytes(Workload(model=llama_8b, lora_dropout=0.05, lora_dropout_fused=True), "lora", 2)
    assert fused == plain < kept
    assert (kept - fused) * 4 * 2048 * 32 / 2**30 > 17   # GiB at LoRA 8B, 4 x 2,048 tokens (the docstring's 17.5)


@pytest.mark.gpu
def test_fused_adapters_compute_what_peft_computes_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plain = tiny_lora(dtype=torch.bfloat16, device="cuda")
    for p in plain.parameters():   # peft keeps adapters in fp32; DeepSpeed's bf16 engine casts them, as here
        p.data = p.data.to(torch.bfloat16)
    fused = copy.deepcopy(plain)
    fuse(fused)
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16 == layer.base_layer.weight.dtype   # the addmm path
    batch = ids("cuda")
    loss, grads, after = step(plain, batch)
    fused_loss, fused_grads, fused_after = step(fused, batch)
    assert fused_loss == pytest.approx(loss, rel=1e-3)
    for name, g in grads.items():   # bf16: peft rounds the adapter's sum three times, the fused GEMM once
        off = (fused_grads[name].float() - g.float()).norm() / g.float().norm()
        assert off < 5e-2, f"{name}: {off:.3%} off peft's (on CPU in bf16: 1.2% at most; another mask: 38% or more)"
    assert torch.equal(after, fused_after)
