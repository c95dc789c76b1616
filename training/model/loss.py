"""A causal-LM loss that never holds the full logits.

The plain path computes logits = hidden @ W^T for every token (B x S x V: 8 x 2048 x 128k in
fp32 is 8 GiB, and log_softmax's saved output and the two gradients triple it) and then the
cross entropy. Here the tokens go through the LM head in chunks; for each chunk the forward
computes its logits, its summed loss, and right away the gradients of that loss with respect to
the chunk's hidden states and to W, and drops the logits. Backward only scales the stored
gradients. Same matmuls as the plain path (one forward, two backward), same result within
rounding; peak memory for the loss falls from ~12 bytes x B x S x V to one chunk's logits.

How it plugs in without changing parameter names (checkpoints and exports stay as they were):
`enable(model)` replaces, on the instance, the Hugging Face causal LM's `forward` with one that
runs the decoder and then calls the LM head MODULE with the labels (`lm_head(hidden, labels=...)`).
Calling the module, not reading `lm_head.weight`, is what makes it right under ZeRO-3: DeepSpeed
gathers a partitioned weight in the module's pre-forward hook and reduces its gradient in the
module's backward hooks. Without labels (generation), both fall back to the original code.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from zerotune.core.memory import FUSED_CHUNK as CHUNK_TOKENS   # 4096 x 128k x 4 bytes = 2 GiB of fp32 logits

IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight^T, labels) / n_target, computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, n_target: float, chunk: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)   # softmax and sums: fp32 at least
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight.t()).to(acc)
            valid = y != IGNORE
            target = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            # d loss / d logits = (softmax - onehot) / n_target on tokens with a label, 0 elsewhere
            logits.sub_(lse[:, None]).exp_()
            logits[torch.arange(len(y), device=y.device), target] -= 1.0
            logits.mul_((valid.to(acc) / n_target)[:, None])
            g = logits.to(h.dtype)
            grad_hidden[start:start + chunk] = g @ weight
            if grad_weight is not None:
                grad_weight += (g.t() @ h).to(acc)   # accumulated over chunks in fp32
            del logits, g
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype, ctx.has_weight_grad = weight.dtype, grad_weight is not None
        return total / n_target

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return grad_hidden * grad_out.to(grad_hidden.dtype), gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, n_target: float,
                         chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Summed cross entropy of (hidden @ weight^T) against labels (IGNORE = no loss), divided by
    n_target. hidden: [N, d]; weight: [V, d]; labels: [N]."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, float(n_target), chunk)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position i predicts token i+1, as transformers' ForCausalLMLoss shifts them."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE)


def supported(model) -> bool:
    """Models whose head is a plain linear layer over the decoder's last hidden state (not a
    mixture of experts: the router's aux loss comes with the model's own forward, model/moe.py)."""
    cfg = model.config
    head = getattr(model, "lm_head", None)
    return (isinstance(head, torch.nn.Linear) and head.bias is None and hasattr(model, "model")
            and not getattr(cfg, "output_router_logits", False)
            and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None))


def decoder_loss(model, shifted_labels, n_target, input_ids=None, **kwargs):
    """The decoder, then the head's loss against labels already shifted (training position i
    predicts shifted_labels[i]): the chunked loss when `enable` routed the head through it, the
    plain fp32 cross entropy otherwise. Summed token loss / n_target; the logits are not returned.
    The chunked path's forward and the sequence-parallel forward (sequence_parallel.py) use it."""
    kwargs.pop("use_cache", None)
    hidden = model.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    if getattr(model, "_zerotune_fused_loss", False):
        loss = model.lm_head(hidden, labels=shifted_labels, n_target=n_target)
    else:
        logits = model.lm_head(hidden).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted_labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum") / n_target
    return types.SimpleNamespace(loss=loss, logits=None)


def enable(model, liger: bool = False) -> bool:
    """Route the training loss of `model` (a transformers *ForCausalLM) through the chunked loss
    (liger: liger-kernel's fused linear cross entropy instead, ZeRO 0-2 only: training/model/kernels.py).
    Returns False, changing nothing, for heads it does not cover."""
    if not supported(model) or getattr(model, "_zerotune_fused_loss", False):
        return False
    head = model.lm_head
    plain_head, plain_forward = head.forward, model.forward

    def head_forward(self, hidden, labels=None, n_target=None):
        if labels is None:
            return plain_head(hidden)
        h = hidden.reshape(-1, hidden.shape[-1])
        if liger:
            from zerotune.training.model.kernels import fused_linear_cross_entropy
            return fused_linear_cross_entropy(h, self.weight, labels.reshape(-1), IGNORE) / n_target
        return linear_cross_entropy(h, self.weight, labels.reshape(-1), n_target)

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return plain_forward(input_ids=input_ids, **kwargs)
        shifted = shift_labels(labels)
        n = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE).sum()
        return decoder_loss(self, shifted, n, input_ids=input_ids, **kwargs)

    head.forward = types.MethodType(head_forward, head)
    model.forward = types.MethodType(forward, model)
    model._zerotune_fused_loss = True
    return True
