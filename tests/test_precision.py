"""train.precision (issue 26): the recipe key, `auto` resolved by core/precision.py (GPU capability,
the measured table), the refusals before torchrun, and which linears training/model/fp8.py puts
in FP8 (converted on CPU through torchao's emulation of the FP8 GEMM). The GPU numerics are
tests/test_fp8.py."""
from __future__ import annotations


import pytest
import yaml

from conftest import base_recipe, write_recipe, zerotune
from zerotune.core import precision
from zerotune.core.precision import Measured, choose
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe

H100 = (9, 0)
RUN = dict(method="lora", zero=0, dtype="bf16", has_torchao=True, hidden=4096, tokens=8192)


def test_recipe_key(tmp_path):
    def recipe(**train):
        return validate_recipe(base_recipe(tmp_path, train={"max_steps": 1, **train}))
    assert recipe().train.precision == "auto"
    for v in ("bf16", "fp8", "auto"):
        assert recipe(precision=v).train.precision == v
    with pytest.raises(Exception, match="train.precision"):
        recipe(precision="fp16")


def test_auto_is_bf16_unless_measured_faster():
    value, why = choose("auto", capability=H100, table=(), **RUN)
    assert value == "bf16" and why == "fp8 not measured faster for lora at hidden 4096, 8192 tokens per micro-batch"
    # the shipped table: LoRA on an 8B (hidden 4096) measured faster from 8,192 tokens per micro-batch on Hopper
    value, why = choose("auto", capability=H100, **RUN)
    assert value == "fp8" and why.startswith("measured 1.11x for lora at hidden 4096, 8192 tokens (H100 2026-12-07 call H2")
    assert choose("auto", capability=H100, **{**RUN, "tokens": 4096})[0] == "bf16"
    assert choose("auto", capability=H100, **{**RUN, "method": "full"})[0] == "bf16"
    row = Measured("lora", H100, 4096, 8192, 1.3, "H200 test")
    assert choose("auto", capability=H100, table=(row,), **RUN) == (
        "fp8", "measured 1.30x for lora at hidden 4096, 8192 tokens (H200 test)")
    # a row at fewer tokens is a lower bound; one at more tokens, another GPU or method, or too small a gain is not
    assert choose("auto", capability=H100, table=(row,), **{**RUN, "tokens": 32768})[0] == "fp8"
    assert choose("auto", capability=H100, table=(row,), **{**RUN, "tokens": 4096})[0] == "bf16"
    assert choose("auto", capability=(10, 0), table=(row,), **RUN)[0] == "bf16"
    assert choose("auto", capability=H100, table=(row,), **{**RUN, "method": "full"})[0] == "bf16"
    assert choose("auto", capability=H100, table=(Measured("lora", H100, 4096, 8192, 1.02, "x"),), **RUN)[0] == "bf16"


@pytest.mark.parametrize("change, says", [
    ({"capability": (8, 0)}, "compute capability 8.0 has no FP8"),
    ({"capability": None}, "no CUDA GPU"),
    ({"has_torchao": False}, "torchao is not installed"),
    ({"method": "qlora"}, "NF4 base is dequantised to bf16"),
    ({"method": "ia3"}, "FP8 is for full and lora"),
    ({"zero": 3}, "distributed.zero 3"),
    ({"dtype": "fp32"}, "model.dtype fp32"),
])
def test_fp8_refused_or_auto_bf16_where_it_cannot_run(change, says):
    row = Measured("lora", H100, 4096, 8192, 1.3, "H200 test")
    args = {**RUN, "capability": H100, "table": (row,), **change}
    value, why = choose("auto", **args)
    assert value == "bf16" and says in why
    with pytest.raises(RecipeError, match=f"^train.precision: fp8 cannot run here: .*{says}"):
        choose("fp8", **args)
    assert choose("bf16", **args) == ("bf16", "as set")


def test_launcher_resolves_auto_for_the_local_gpu(tmp_path, monkeypatch):
    from zerotune.launcher import prepare
    from zerotune.launcher.gpus import GpuMemory
    recipe = validate_recipe(base_recipe(tmp_path, model={"dtype": "bf16"}, distributed={"zero": 0},
                                         data={"max_len": 256}, train={"max_steps": 1, "micro_batch_size": 4}))
    gpu = GpuMemory(80 * 2 ** 30, "nvidia-smi", "gpus", capability=H100)
    out, why = prepare.resolve_precision(recipe, gpu, {"hidden_size": 64})
    assert out.train.precision == "bf16" and why == "fp8 not measured faster for full at hidden 64, 1024 tokens per micro-batch"
    monkeypatch.setattr(precision, "MEASURED", (Measured("full", H100, 64, 1024, 1.2, "test"),))
    out, why = prepare.resolve_precision(recipe, gpu, {"hidden_size": 64})
    assert out.train.precision == "fp8" and why.startswith("measured 1.20x")
    out, why = prepare.resolve_precision(recipe, gpu, {"hidden_size": 64}, replan=lambda r: None)
    assert out.train.precision == "bf16" and why.endswith("but the plan does not fit with the FP8 copy of the frozen weights")
    again = recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": "fp8", "gradient_checkpointing": 3})})
    assert prepare.resolve_precision(recipe, gpu, {"hidden_size": 64}, replan=lambda r: again) == (
        again, "measured 1.20x for full at hidden 64, 1024 tokens (test)")
    slurm = GpuMemory(80 * 2 ** 30, "cluster.gpu_memory", "slurm")   # its ranks decide
    assert prepare.resolve_precision(recipe, slurm, {"hidden_size": 64}) == (recipe, "decided on each rank")


def test_auto_fp8_replans_for_the_kept_fp8_copy(tmp_path):
    """LoRA 8B at 4 x 2048 on an 80 GiB Hopper GPU: the bf16 plan leaves no room for the base's FP8 copy
    (6.5 GiB), so auto's fp8 is planned again, with more layers checkpointed, as call H2 measured it
    (1.11x bf16 with 4 more layers checkpointed); where nothing fits with the copy, bf16."""
    from test_gpu_memory import peft_8b
    from zerotune.launcher import prepare
    from zerotune.launcher.gpus import GpuMemory
    from zerotune.core.layers import checkpointed_layers
    from zerotune.launcher.plan import check_fits
    planning = peft_8b(tmp_path)
    for gib in (80, 140):
        gpu = GpuMemory(gib * 2 ** 30, "nvidia-smi", "gpus", capability=H100)
        planned = prepare.resolve(planning, 1, 1, gpu)
        fp8 = planned.model_copy(update={"train": planned.train.model_copy(update={"precision": "fp8"})})
        again = prepare.replan_fp8(planning, fp8, 1, 1, gpu)
        assert again.train.precision == "fp8" and again.train.micro_batch_size == planned.train.micro_batch_size
        check_fits(again, 1, 1, gpu.bytes)
        if gib == 80:     # the copy needs room: more layers checkpointed than for bf16
            assert checkpointed_layers(again.train, 32) > checkpointed_layers(planned.train, 32), (planned.train, again.train)
        else:             # an H200 has room for it: the plan as it was
            assert again == fp8
    tiny = GpuMemory(20 * 2 ** 30, "nvidia-smi", "gpus", capability=H100)
    assert prepare.replan_fp8(planning, fp8, 1, 1, tiny) is None


def fake_smi(tmp_path, cap: str) -> str:
    """An nvidia-smi that sees one H200-sized GPU of compute capability `cap`."""
    from test_gpu_memory import fake_smi as smi
    return smi(tmp_path, 143771, caps=(cap,))


def test_fp8_without_fp8_gpu_is_one_line_before_torchrun(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={"dtype": "bf16"}, distributed={"zero": 0},
                                                train={"max_steps": 1, "precision": "fp8"}))
    r = zerotune("train", str(recipe), check=False, timeout=300, env={"PATH": fake_smi(tmp_path, "8.0")})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("zerotune: error: train.precision: fp8 cannot run here: GPU compute capability 8.0"), lines
    assert not (tmp_path / "runs").exists()


def test_auto_is_recorded_and_said_in_the_plan_line(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={"dtype": "bf16"}, distributed={"zero": 0},
                                                train={"max_steps": 1, "micro_batch_size": 2}))
    r = zerotune("launch", str(recipe), "--dry-run", env={"PATH": fake_smi(tmp_path, "9.0")})
    assert "precision bf16 (fp8 not measured faster for full at hidden 64, 256 tokens per micro-batch)" in r.stderr
    saved = yaml.safe_load((tmp_path / "runs" / "t" / "recipe.yaml").read_text())
    assert saved["train"]["precision"] == "bf16"


# ----------------------------------------------------------------------------- which linears
def tiny_llama():
    """hidden 32 (attention projections convert), intermediate 40 (MLP: not a multiple of 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_full_converts_decoder_linears_only():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear
    from zerotune.training.model import fp8
    model = tiny_llama()
    names = fp8.convert(model, emulate=True)
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"
    assert kinds["model.layers.0.mlp.gate_proj"] == "Linear"      # 32 x 40: not a multiple of 16
    assert type(model.model.layers[0].self_attn.q_proj) is Float8Linear   # trainable: torchao's own
    ids = __import__("torch").randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_lora_converts_the_frozen_base_not_the_adapters():
    pytest.importorskip("torchao")
    import peft
    import torch
    from zerotune.training.model import fp8
    from zerotune.training.model.fp8_frozen import FrozenFloat8Linear
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
    names = fp8.convert(model, emulate=True)
    layer = "base_model.model.model.layers.0"
    assert f"{layer}.self_attn.q_proj.base_layer" in names and f"{layer}.self_attn.k_proj" in names
    assert not [n for n in names if "lora_" in n or "gate_proj" in n or "lm_head" in n]
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer) is FrozenFloat8Linear and type(q.lora_A["default"]) is torch.nn.Linear
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert q.lora_B["default"].weight.grad is not None and q.base_layer.weight.grad is None


def test_frozen_fp8_linear_matches_torchao_without_the_weight_gradient():
    """FrozenFloat8Linear's output and input gradient equal torchao's Float8Linear's bit for bit
    (same casts, same GEMMs); only the weight's gradient GEMM is skipped."""
    pytest.importorskip("torchao")
    import dataclasses
    import torch
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear
    from zerotune.training.model.fp8_frozen import FrozenFloat8Linear
    for name in ("tensorwise", "rowwise"):
        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(name), emulate=True)
        linear = torch.nn.Linear(64, 32, bias=True).to(torch.bfloat16).requires_grad_(False)
        x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
        outs = []
        for cls in (Float8Linear, FrozenFloat8Linear):
            y = cls.from_float(linear, config=config)(x)
            outs.append((y, torch.autograd.grad(y.square().sum(), x)[0]))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_frozen_fp8_linear_keeps_its_fp8_weight_until_the_weight_changes():
    """Tensorwise (not emulated): the weight is cast to FP8 once and kept; output equals torchao's
    Float8Linear's (same casts), the input's gradient within one e5m2 rounding; an in-place write of
    the weight (peft's merge does one) makes the copy again, so the output follows the new weight."""
    pytest.importorskip("torchao")
    import dataclasses
    import torch
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear
    from zerotune.training.model import fp8_frozen
    from zerotune.training.model.fp8_frozen import FrozenFloat8Linear
    config = Float8LinearConfig.from_recipe_name("tensorwise")
    assert fp8_frozen.tensorwise(config) and not fp8_frozen.tensorwise(dataclasses.replace(config, emulate=True))
    assert not fp8_frozen.tensorwise(Float8LinearConfig.from_recipe_name("rowwise"))
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=True).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    ref = Float8Linear.from_float(linear, config=dataclasses.replace(config, emulate=True))
    got = FrozenFloat8Linear.from_float(linear, config=config)
    calls = []
    real = fp8_frozen.quantize
    fp8_frozen.quantize = lambda t, dtype: calls.append((tuple(t.shape), dtype)) or real(t, dtype)
    try:
        y_ref, y = ref(x), got(x)
        g_ref = torch.autograd.grad(y_ref.square().sum(), x)[0]
        g = torch.autograd.grad(y.square().sum(), x)[0]
        got(x).sum().backward()
        weight_casts = [c for c in calls if c[0] == (32, 64)]
        assert weight_casts == [((32, 64), torch.float8_e4m3fn)], calls      # once, for three calls
        assert torch.equal(y, y_ref) and torch.allclose(g, g_ref, rtol=0.02, atol=0.02)
        assert got.weight.grad is None and list(got.state_dict()) == ["weight", "bias"]
        exact = torch.nn.functional.linear(x, linear.weight, linear.bias)
        assert (y - exact).float().norm() / exact.float().norm() < 0.06      # e4m3: ~3% here
        with torch.no_grad():
            got.weight.mul_(-2)                                               # in place: _version moves
        y2 = got(x)
        assert len([c for c in calls if c[0] == (32, 64)]) == 2
        exact2 = torch.nn.functional.linear(x, got.weight, got.bias)
        assert (y2 - exact2).float().norm() / exact2.float().norm() < 0.06
    finally:
        fp8_frozen.quantize = real


def test_fp8_gemm_benchmark_imports_and_helps_on_cpu():
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_gemm.py"), "--help"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--compile {off,on,both}" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_gemm.py")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and '"error": "needs a CUDA GPU with FP8' in r.stdout
