"""On a CUDA GPU: LoRA on a small random Llama at a long sequence (16,384 tokens) with k of n layers
checkpointed and with some checkpointed inputs offloaded to pinned host memory (prefetched on a side
stream) trains the losses of every layer checkpointed, within bf16 tolerance (rel 2e-3: the same
kernels, the recompute of a checkpointed layer gives its forward's values; flash/cuDNN attention's
backward may sum in another order), and holds less memory than no checkpointing (partial) or than
every input on the GPU (offload). Skips without CUDA."""
from __future__ import annotations

import gc

import pytest

from conftest import base_recipe

pytestmark = pytest.mark.gpu
SEQ = 16384
LAYERS = 8


def _model_dir(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=LAYERS, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    path = tmp_path / "llama-small"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _run(path, tmp_path, steps: int = 3, **train) -> tuple[list[float], float]:
    """Losses of `steps` SGD steps on one 16k-token row, and the run's peak GPU memory (GiB) above what
    was allocated before it."""
    import torch
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.model.build import build_model
    r = validate_recipe(base_recipe(
        tmp_path, model={"path": str(path), "dtype": "bf16", "attn_implementation": "sdpa", "kernels": "none"},
        method={"kind": "lora", "lora": {"r": 16, "dropout": 0.0}}, data={"max_len": SEQ},
        train={"micro_batch_size": 1, "compile": False, "fused_loss": True, "tiled_mlp": False, **train},
        distributed={"zero": 0}))
    gc.collect()   # the previous run's model: its hooks make reference cycles that only the collector frees
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() / 2 ** 30   # other tests' tensors: the peak counts above them
    torch.manual_seed(0)
    model = build_model(r, {"zero_optimization": {"stage": 0}})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 32000, (1, SEQ), generator=torch.Generator().manual_seed(1)).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 - base
    del model, opt
    return losses, peak


def test_k_of_n_checkpointed_and_offloaded_layers_on_gpu(tmp_path):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path = _model_dir(tmp_path)
    every, every_peak = _run(path, tmp_path, gradient_checkpointing=True, offload_activations=False)
    none, none_peak = _run(path, tmp_path, gradient_checkpointing=False, offload_activations=False)
    half, half_peak = _run(path, tmp_path, gradient_checkpointing=LAYERS // 2, offload_activations=False)
    off, off_peak = _run(path, tmp_path, gradient_checkpointing=True, offload_activations=LAYERS // 2)
    for losses in (none, half, off):
        assert losses == pytest.approx(every, rel=2e-3), (losses, every)
    assert every_peak < half_peak < none_peak, (every_peak, half_peak, none_peak)
    assert off_peak < every_peak, (off_peak, every_peak)


def test_kept_attention_on_gpu_skips_the_recompute_of_attention(tmp_path):
    """train.recompute_attention: false on CUDA: the attention kernel sdpa picks here (cuDNN or flash)
    is one of long_sequence.ATTENTION_OPS, so it runs once a layer per step instead of twice; the
    losses are those of the plain recompute; the kept outputs cost memory (8 layers x 16k x 1024 x 2
    bytes = 256 MiB)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from zerotune.training.model.long_sequence import ATTENTION_OPS
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func.__name__.split(".")[0] in ATTENTION_OPS
            return func(*args, **(kwargs or {}))

    path = _model_dir(tmp_path)
    every, every_peak = _run(path, tmp_path, gradient_checkpointing=True, offload_activations=False)
    kept, kept_peak = _run(path, tmp_path, gradient_checkpointing=True, offload_activations=False,
                           recompute_attention=False)
    assert kept == pytest.approx(every, rel=2e-3), (kept, every)
    assert kept_peak > every_peak, (kept_peak, every_peak)
    calls = {}
    for recompute in (True, False):
        with CountAttention() as count:
            _run(path, tmp_path, steps=1, gradient_checkpointing=True, offload_activations=False,
                 recompute_attention=recompute)
        calls[recompute] = count.calls
    assert calls == {True: 2 * LAYERS, False: LAYERS}, calls
