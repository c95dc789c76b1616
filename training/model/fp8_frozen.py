"""An FP8 linear for a frozen weight (a LoRA base): torchao's Float8Linear with a backward that
computes only the input's gradient. torchao's matmul_with_hp_or_float8_args always computes the
weight's gradient GEMM too (autograd then drops it) and keeps the input for it: a third FP8 GEMM
and an activation per layer that a frozen base never needs. Imported only when FP8 is chosen
(it needs torchao); the casts are torchao's own (hp_tensor_to_float8_dynamic), so tensorwise and
rowwise configs behave as in Float8Linear.
"""
from __future__ import annotations

import torch
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
from torchao.float8.float8_training_tensor import GemmInputRole


def _cast(t, cast_config, mm_config, role, dim, config):
    return hp_tensor_to_float8_dynamic(
        t, cast_config.target_dtype, mm_config, gemm_input_role=role,
        scaling_granularity=cast_config.scaling_granularity,
        axiswise_dim=get_maybe_axiswise_dim(dim, cast_config.scaling_granularity),
        round_scales_to_power_of_2=config.round_scales_to_power_of_2)


@torch._dynamo.allow_in_graph
class _frozen_matmul(torch.autograd.Function):
    """input @ weight_t in FP8; backward: grad_input only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, input_hp, weight_hp_t, mm_config, config):
        ctx.save_for_backward(weight_hp_t)
        ctx.mm_config, ctx.config = mm_config, config
        x = _cast(input_hp, config.cast_config_input, mm_config, GemmInputRole.INPUT, -1, config)
        w = _cast(weight_hp_t, config.cast_config_weight, mm_config, GemmInputRole.WEIGHT, 0, config)
        shape = x.shape
        out = torch.mm(x.reshape(-1, shape[-1]), w)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        (weight_hp_t,) = ctx.saved_tensors
        c, mm = ctx.config, ctx.mm_config
        shape = grad_output.shape
        go = _cast(grad_output.reshape(-1, shape[-1]), c.cast_config_grad_output, mm, GemmInputRole.GRAD_OUTPUT, -1, c)
        w = _cast(weight_hp_t, c.cast_config_weight_for_grad_input, mm, GemmInputRole.WEIGHT, -1, c)
        grad_input = torch.mm(go, w.t())
        return grad_input.reshape(*shape[:-1], grad_input.shape[-1]), None, None, None


class FrozenFloat8Linear(Float8Linear):
    """Float8Linear for a weight that never trains (requires_grad False); falls back to
    Float8Linear's own matmul if the weight is ever unfrozen."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return super().forward(input)
        if torch.is_autocast_enabled():
            input = input.to(torch.get_autocast_gpu_dtype())
        output = _frozen_matmul.apply(input, self.weight.t(), self.linear_mm_config, self.config)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output
