"""peft's LoRA adapters with less memory traffic: the dropout drawn again in the backward instead
of kept, and lora_B's output added inside its GEMM.

1. Dropout. peft computes `lora_B(lora_A(dropout(x))) * scaling` beside each frozen linear. For its
backward, autograd keeps what dropout returned (x's size, in the adapter's dtype) and dropout's mask
(1 byte an element), one pair for every adapted linear: seven in a Llama layer, three of them of
the same x (q, k, v). For Llama-3 8B that is 72 KB a token a layer beside the ~148 KB a LoRA layer
keeps without dropout: 17.5 GiB at 4 x 2,048 tokens, 70 GiB at 32,768 (benchmarks/README.md, issue 26).
DroppedLoraA (lora_A's class, swapped in place, so parameter names, state dicts, merges and exports
stay peft's) keeps x itself, which the layer keeps anyway (the other adapters of the same input, or
the frozen linear's backward), and the random generator's state at the draw. Its backward restores
that state, draws the same mask with the same kernel (CUDA: the fused dropout F.dropout runs; CPU:
F.dropout's own bernoulli noise), and puts the generator back, so nothing after it sees another
random stream. Values and gradients equal peft's (tests/test_lora_fused.py); the cost is one dropout
kernel again in the backward. core/memory.py counts such adapters like LoRA without dropout
(Workload.lora_dropout_fused).

2. The output. peft's `result + lora_B(h) * scaling` writes h @ B^T (the linear's output size), scales
it into a second tensor and adds that into a third: 12 bytes of traffic an output element in bf16,
and in the backward the output's gradient is scaled into another full-size tensor (4 more). Fused, one
GEMM does it (torch.addmm(result, h, B^T, alpha=scaling): the epilogue reads result once, 4 bytes),
and the scaling moves onto the small r-wide gradients. At Llama-3 8B, 4 x 2,048 tokens, that is about
135 GB of traffic a step less (43,008 output features a token a layer). The sum is rounded once
instead of three times, so values agree with peft's to rounding, not bit for bit. Only where lora_B's
parameters are whole on the GPU when the layer runs (ZeRO 0-2: ZeRO-3 gathers them in lora_B's own
forward, which the fused GEMM skips).

Not fused (peft's modules stay): DoRA and other LoRA variants (their magnitude term uses the dropped
input too), dropout 0 (nn.Identity: nothing is kept), 4-bit bases' output (bitsandbytes' own
LoRA classes), and layers that torch.compile traces (train.compile: inductor fuses the same; build.py).

    fuse(model, zero3=stage == 3)   # build.py, after peft added the adapters
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _draw(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x, p), what scales a gradient through it), with exactly F.dropout's random draws."""
    if x.is_cuda:   # at::dropout's fused kernel on CUDA: native_dropout, a boolean mask
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)   # at::dropout's CPU path (_dropout_impl)
    return x * noise, noise


def _through(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, 1 / (1 - p))
    return grad * mask


def _generator(x: torch.Tensor) -> torch.Generator:
    """The generator F.dropout draws x's mask from."""
    return torch.cuda.default_generators[x.device.index] if x.is_cuda else torch.default_generator


class _dropped_linear(torch.autograd.Function):
    """F.linear(F.dropout(x, p), weight), keeping x and the generator's state instead of the dropped x."""

    @staticmethod
    def forward(ctx, x, weight, p):
        ctx.p, ctx.state = p, _generator(x).get_state()
        dropped, _ = _draw(x, p)
        ctx.save_for_backward(x, weight)
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        generator = _generator(x)
        now = generator.get_state()
        generator.set_state(ctx.state)
        try:
            dropped, mask = _draw(x, ctx.p)
        finally:
            generator.set_state(now)   # the stream goes on where it was
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad2.t().mm(dropped.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_x = _through(grad.matmul(weight), mask, ctx.p) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None


class DroppedLoraA(torch.nn.Linear):
    """peft's lora_A with the adapter's dropout inside (p: dropout's probability); a plain linear in
    eval mode or when no gradient is recorded, where dropout keeps nothing."""
    p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        if not torch.is_grad_enabled() or torch.is_autocast_enabled() or self.bias is not None:
            return F.linear(F.dropout(x, self.p, True), self.weight, self.bias)
        return _dropped_linear.apply(x, self.weight, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p} (drawn again in the backward)"


def fuse(model: torch.nn.Module, zero3: bool = False) -> dict[str, int]:
    """Swap every vanilla LoRA adapter's nn.Dropout (p > 0) and lora_A for nn.Identity and
    DroppedLoraA, and (not zero3) every peft lora.Linear for FusedLoraLinear. Returns how many of
    each: {"dropout": adapters, "output": linears}."""
    counts = {"dropout": 0, "output": 0}
    fused_linear = None if zero3 else _fused_linear_class()
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {})
        for name, dropout in list(dropouts.items()):
            a = lora_a[name] if name in lora_a else None
            if (type(dropout) is not torch.nn.Dropout or not 0 < dropout.p < 1 or name in variants
                    or type(a) is not torch.nn.Linear):
                continue
            a.__class__, a.p = DroppedLoraA, dropout.p
            dropouts[name] = torch.nn.Identity()
            counts["dropout"] += 1
        if fused_linear is not None and type(module) is fused_linear.__bases__[0]:
            module.__class__ = fused_linear
            counts["output"] += 1
    return counts


@functools.cache
def _fused_linear_class():
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        """peft's lora.Linear whose one active vanilla adapter adds lora_B's output inside its GEMM
        (module docstring, 2.); anything else (merged, disabled, several adapters, a variant, a
        bias on lora_B, mixed dtypes, autocast, extra arguments) runs peft's own forward."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            active = self.active_adapters
            name = active[0] if len(active) == 1 else None
            if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
                    or name in self.lora_variant or torch.is_autocast_enabled()):
                return super().forward(x, *args, **kwargs)
            lora_b = self.lora_B[name]
            if lora_b.bias is not None or x.dtype != self.lora_A[name].weight.dtype or x.dtype != lora_b.weight.dtype:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            h = self.lora_A[name](self.lora_dropout[name](x))
            if result.dtype != h.dtype:   # a base in another dtype: peft's sum, in the base's dtype
                return (result + lora_b(h) * self.scaling[name]).to(result.dtype)
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t(),
                              alpha=self.scaling[name])
            return out.view(result.shape)

    return FusedLoraLinear
