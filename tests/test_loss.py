"""The chunked linear cross entropy (training/model/loss.py) gives the plain loss and gradients: on its
own, inside a real model (packed and padded batches), and end to end under ZeRO-3 on 2 ranks,
where the LM head's weight is partitioned and must be gathered for the chunked loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import STORIES, base_recipe, train_losses, write_recipe, zerotune
from zerotune.training.model import loss as L


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_ones(dtype, tol, chunk):
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 50
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = L.IGNORE
    n_target = float((y != L.IGNORE).sum())
    plain = F.cross_entropy((h @ w.t()).double(), y, ignore_index=L.IGNORE, reduction="sum") / n_target
    (2.5 * plain).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused = L.linear_cross_entropy(h, w, y, n_target, chunk=chunk)
    (2.5 * fused).backward()
    assert fused.item() == pytest.approx(plain.item(), rel=tol, abs=tol)
    assert torch.allclose(h.grad.double(), gh.double(), rtol=tol, atol=tol * gh.abs().max().item())
    assert torch.allclose(w.grad.double(), gw.double(), rtol=tol, atol=tol * gw.abs().max().item())
    assert h.grad.dtype == dtype and w.grad.dtype == dtype


def _model():
    return AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float64).train()


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100                                      # a prompt that does not train
    padded = {"input_ids": ids, "labels": labels.masked_fill(torch.arange(24) >= 20, -100),
              "attention_mask": (torch.arange(24) < 20).long().expand(2, 24)}
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)   # two packed samples a row
    packed = {"input_ids": ids, "labels": labels, "position_ids": pos}
    return {"padded": padded, "packed": packed}


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_model_loss_and_gradients_match_transformers(kind):
    batch = _batches()[kind]
    n_target = int((batch["labels"][:, 1:] != -100).sum())
    ref, fused = _model(), _model()
    ref.config.use_cache = fused.config.use_cache = False
    assert L.enable(fused) and not L.enable(fused)            # once only
    # the reference: transformers' logits, then the causal-LM loss in float64 (transformers'
    # own ForCausalLMLoss computes in float32)
    logits = ref(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss_ref = F.cross_entropy(logits.flatten(0, 1), L.shift_labels(batch["labels"]).flatten(),
                               ignore_index=-100, reduction="sum") / n_target
    out = fused(**batch, num_items_in_batch=n_target)
    assert out.logits is None                                 # never materialised
    assert float(out.loss) == pytest.approx(float(loss_ref), rel=1e-10)
    loss_ref.backward()
    out.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12), name
    # without labels (generation, eval of logits) the model is the plain one
    assert torch.equal(fused(input_ids=batch["input_ids"]).logits, ref(input_ids=batch["input_ids"]).logits)


def test_a_head_it_does_not_cover_stays_plain():
    m = _model()
    m.config.final_logit_softcapping = 30.0
    assert not L.enable(m) and not hasattr(m, "_zerotune_fused_loss")


@pytest.mark.slow
def test_zero3_two_ranks_fused_equals_plain(tmp_path):
    """ZeRO-3, 2 processes: the LM head weight is partitioned; the chunked loss reaches it
    through the head module's own forward, so the loss curve and the final weights match."""
    runs = {}
    for fused in (True, False):
        name = f"fused-{fused}".lower()
        r = base_recipe(tmp_path, name=name, train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2,
                                                    "lr": 1e-3, "warmup_steps": 0, "fused_loss": fused,
                                                    "gradient_checkpointing": True})
        zerotune("train", str(write_recipe(tmp_path, r, f"{name}.yaml")), "--nproc", "2")
        runs[fused] = tmp_path / "runs" / name
    a, b = train_losses(runs[True]), train_losses(runs[False])
    assert sorted(a) == [1, 2, 3]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a[s], b[s])
    # the same update (as tests/test_training.py compares it: Adam divides by sqrt(v), so weights
    # whose gradient is ~0 move by different fractions of lr when its last bits differ)
    from safetensors.torch import load_file
    w0 = load_file(str(STORIES / "model.safetensors"))
    wa, wb = (load_file(str(runs[f] / "final" / "model.safetensors")) for f in (True, False))
    assert wa.keys() == wb.keys()
    for k in wa:
        da, db = wa[k] - w0[k], wb[k] - w0[k]
        assert ((da - db).norm() / db.norm()).item() < 1e-3, k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_llama3_vocab_matches_plain_and_saves_memory():
    """On the GPU, bf16, Llama-3's 128k vocabulary, 8 x 2048 tokens: the chunked loss equals the
    plain fp32-softmax loss within bf16 rounding and peaks far below it."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n, d, v = 8 * 2048, 2048, 128256
    h = (torch.randn(n, d, device=dev, generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device=dev, generator=g) * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[: n // 10] = L.IGNORE
    n_target = float((y != L.IGNORE).sum())

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        out.backward()
        torch.cuda.synchronize()
        return out.detach(), (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    plain, plain_gib = peak(lambda: F.cross_entropy((h @ w.t()).float(), y, ignore_index=L.IGNORE,
                                                    reduction="sum") / n_target)
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused, fused_gib = peak(lambda: L.linear_cross_entropy(h, w, y, n_target))
    assert fused.item() == pytest.approx(plain.item(), rel=2e-3)
    for a, b in ((h.grad, gh), (w.grad, gw)):
        assert (a.float() - b.float()).norm() / b.float().norm() < 2e-2
    print(f"loss peak: plain {plain_gib:.2f} GiB, chunked {fused_gib:.2f} GiB")
    assert fused_gib < plain_gib / 3
