"""model.kernels (issue 20): liger-kernel's fused RMSNorm / SwiGLU / RoPE / linear cross entropy.
CPU: `auto` is none without CUDA, an explicit `liger` without the package is a one-line error
before torchrun. GPU (marked `gpu`): loss and gradients with the kernels equal those without on a
tiny Llama, fp32 and bf16, full and LoRA."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import base_recipe, write_recipe, zerotune
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def test_auto_is_none_without_cuda(tmp_path, monkeypatch):
    """Even with the package 'installed' (find_spec faked), no CUDA -> none, on the rank and in
    RUN_DIR/recipe.yaml (no nvidia-smi here: the launcher does not plan for liger)."""
    import torch
    from zerotune.training.model import kernels
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "liger_kernel" else real(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.installed() and not kernels.wanted("auto", "llama")
    with pytest.raises(RecipeError, match="model.kernels: liger needs a CUDA GPU"):
        kernels.wanted("liger", "llama")
    assert not kernels.wanted("none", "llama")
    from zerotune.launcher.gpus import GpuMemory
    from zerotune.launcher.prepare import resolve
    r = resolve(validate_recipe(base_recipe(tmp_path)), 1, 1, GpuMemory(80 * 2 ** 30, "assumed"))
    assert r.model.kernels == "none"


@pytest.mark.skipif(HAS_LIGER, reason="liger-kernel is installed here")
def test_explicit_liger_without_the_package_is_one_line_before_torchrun(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={**base_recipe(tmp_path)["model"], "kernels": "liger"}))
    r = zerotune("train", str(recipe), check=False, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == ("zerotune: error: model.kernels: liger needs the liger-kernel "
                                                      "package (pip install 'zerotune[gpu]'), not installed in this "
                                                      "environment"), r.stderr
    assert not (tmp_path / "runs").exists()


def test_planner_counts_liger_savings():
    from test_plan import LLAMA_8B
    from zerotune.core.memory import Strategy, Workload, estimate_memory
    w = dict(model=LLAMA_8B, micro_batch_size=4, seq_len=2048)
    plain = estimate_memory(Workload(**w), Strategy("lora", 0, grad_ckpt=False))
    liger = estimate_memory(Workload(**w, kernels="liger"), Strategy("lora", 0, grad_ckpt=False))
    chunked = estimate_memory(Workload(**w, fused_loss=True), Strategy("lora", 0, grad_ckpt=False))
    assert liger["logits"] == chunked["logits"] < plain["logits"]
    saved = 32 * 4 * 2048 * (2 * 4096 + 14336) * 2      # layers x tokens x (2 d + ff) x bf16
    assert chunked["activations"] - liger["activations"] == saved
    z3 = estimate_memory(Workload(**w, kernels="liger"), Strategy("lora", 3, grad_ckpt=False))
    assert z3["logits"] == plain["logits"]             # ZeRO-3 keeps train.fused_loss's loss


# ----------------------------------------------------------------------------- GPU
def _tiny_llama(dtype, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to("cuda", dtype)


def _loss_and_grads(model, ids, labels):
    n = (labels[:, 1:] != -100).sum()
    loss = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    loss.backward()
    return loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_kernels_match_without(tmp_path, dtype, tol, method):
    import torch
    if not (torch.cuda.is_available() and HAS_LIGER):
        pytest.skip("needs CUDA and liger-kernel")
    from types import SimpleNamespace
    from zerotune.training.model import kernels, loss as zloss
    from zerotune.training.model.build import DTYPES
    torch_dtype = DTYPES[dtype]
    ids = torch.randint(0, 32000, (2, 256), device="cuda")
    labels = ids.clone()
    labels[:, :32] = -100
    from transformers.models.llama import modeling_llama as ml
    # liger also patches the family's module (RoPE function, norm and MLP classes): undo it after
    saved = {k: getattr(ml, k) for k in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    results = []
    try:   # a failure with liger's patches in place must not leak them into the tests after this one
        for liger in (False, True):
            model = _tiny_llama(torch_dtype)
            if liger:
                assert kernels.apply(model, SimpleNamespace(model=SimpleNamespace(kernels="liger")))
                assert zloss.enable(model, liger=True)
            if method == "lora":
                import peft
                model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                    init_lora_weights=False))
            results.append(_loss_and_grads(model, ids, labels))
    finally:
        for k, v in saved.items():
            setattr(ml, k, v)
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=tol, atol=tol), (l0, l1)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        rel = (g0[k] - g1[k]).norm() / g0[k].norm().clamp(min=1e-12)
        assert rel < (tol * 3 if dtype == "bf16" else 1e-3), (k, rel.item())


def test_launcher_decides_auto_for_local_gpus_only(tmp_path, monkeypatch):
    """auto: liger where nvidia-smi sees GPUs and the package is there; a Slurm job's ranks decide."""
    from zerotune.launcher.gpus import GpuMemory, kernels_for
    recipe = validate_recipe(base_recipe(tmp_path))      # stories260K: a llama
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "liger_kernel" else real(n, *a))
    size = 80 * 2 ** 30
    assert kernels_for(recipe, GpuMemory(size, "nvidia-smi", "gpus")) == "liger"
    assert kernels_for(recipe, GpuMemory(size, "--gpu-memory", "gpus")) == "liger"
    assert kernels_for(recipe, GpuMemory(size, "assumed", "local")) == "none"       # no GPU here
    assert kernels_for(recipe, GpuMemory(size, "cluster.gpu_memory", "slurm")) == "auto"
