"""train.precision: fp8 numerics on a GPU (marked `gpu`; skipped without CUDA, without FP8 tensor
cores (compute capability < 8.9) or without torchao).

The same random Llama (hidden 1024, intermediate 2816, 4 layers, 16 heads: every decoder linear's
dims are multiples of 16) trains the same 20 steps on the same batches in bf16 and with
training/model/fp8.py's conversion (real FP8 GEMMs), full fine-tune and LoRA, and the losses
must agree step for step within TOLERANCE (relative).

Why 3%: e4m3 keeps 3 mantissa bits, so one element's rounding error is up to 2^-4 (6%) but about
2% RMS; the GEMM sums 1024-2816 such products, whose errors mostly cancel, so one layer's output
is off by well under 1%, and published torchao runs (torchtitan, Llama 3 8B) track bf16's loss
within about 1%. Over 20 optimizer steps at lr 1e-3 (4 fixed batches, memorised, so the loss
falls well below ln 4096) the two trajectories drift apart by the
accumulated difference of their updates; 3% leaves room for that drift while anything actually
wrong (a scale applied twice or not at all, e5m2 where e4m3 belongs, a lost gradient) moves the
loss by tens of percent or makes it non-finite. The FP8 run must also learn (its last loss
below its first), so agreement cannot come from neither run training. The same comparison
run on CPU through torchao's emulated FP8 GEMM (hidden 256, 2 layers, 4 x 128 tokens, 20 steps) gave
at most 1.0% (full; loss 8.39 -> 6.27) and 0.03% (LoRA; 8.39 -> 7.96): 3% is three times that.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

TOLERANCE = 0.03
STEPS = 20


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return "needs FP8 tensor cores (compute capability 8.9+)"
    if importlib.util.find_spec("torchao") is None:
        return "needs torchao"
    return None


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=4096, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)


def _train(model, batches) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fp8_losses_track_bf16(method):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from zerotune.training.model import fp8
    from zerotune.training.model.fp8_frozen import FrozenFloat8Linear
    base = _model()
    if method == "lora":
        import peft
        base = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    g = torch.Generator(device="cuda").manual_seed(1)
    pool = torch.randint(0, 4096, (4, 8, 256), device="cuda", generator=g)   # 4 batches of 8 x 256, cycled
    batches = [pool[i % 4] for i in range(STEPS)]
    converted = copy.deepcopy(base)
    names = fp8.convert(converted)
    assert len(names) == 4 * 7, names    # q, k, v, o, gate, up, down in every layer
    if method == "lora":
        assert all(type(m) is FrozenFloat8Linear for n, m in converted.named_modules() if n.endswith("base_layer"))
    ref, got = _train(base, batches), _train(converted, batches)
    assert all(map(lambda x: x == x, got)) and got[-1] < got[0], got
    rel = [abs(a - b) / abs(a) for a, b in zip(ref, got)]
    assert max(rel) <= TOLERANCE, [f"step {i}: bf16 {a:.4f} fp8 {b:.4f}" for i, (a, b) in enumerate(zip(ref, got))]
