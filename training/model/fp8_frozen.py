"""An FP8 linear for a frozen weight (a LoRA base): torchao's Float8Linear with a backward that
computes only the input's gradient, and, with tensorwise scales, the weight cast to FP8 once.

torchao's Float8Linear is built for weights that train: every call casts the bf16 weight to FP8
again (an amax pass, a scale, a cast: in eager mode several full reads of every weight, forward and
backward), computes the weight's gradient GEMM (autograd then drops it for a frozen weight) and
keeps the input for it. A frozen weight changes only when something writes it in place (peft's
merge, a load), so FrozenFloat8Linear keeps its FP8 copy and scale and redoes them only when the
weight's version or storage changes. Per call what remains is the input's cast (forward) and the
output gradient's (backward), each fused into one reduction and one cast by torch.compile on CUDA.

Memory: one byte per frozen weight element for the kept FP8 copy (the bf16 weight stays: exports,
merges and state dicts see an ordinary nn.Linear); the backward transposes that copy into a
temporary for its GEMM (cuBLAS FP8 takes only row-major x column-major). core/memory.py counts it.

Tensorwise only (one scale per tensor, torchao's recipe of that name: e4m3 input and weight,
e5m2 output gradient). Other recipes (rowwise) keep torchao's casts per call and only skip the
weight's gradient. Imported only when FP8 is chosen (it needs torchao).
"""
from __future__ import annotations

import functools

import torch
from torchao.float8.config import ScalingGranularity
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
from torchao.float8.float8_training_tensor import GemmInputRole

EPS = 1e-12     # torchao's amax floor: an all-zero tensor gets a finite scale


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in FP8 `dtype`, the fp32 inverse scale): t ~= t8 * inverse, one scale for the whole
    tensor chosen so that its largest magnitude lands on the format's largest value. t is 2-D."""
    fmax = torch.finfo(dtype).max
    # each row's amax first, then theirs: compiled with symbolic sizes, a whole-tensor reduction ran
    # 4x slower than this per-row one (benchmarks/results/raw/2026-12-07-h100-callH1)
    amax = t.detach().abs().amax(dim=-1).amax().to(torch.float64).clamp(min=EPS)
    scale = (fmax / amax).to(torch.float32)
    t8 = (t.to(torch.float32) * scale).clamp(-fmax, fmax).to(dtype)
    return t8, scale.reciprocal()


def transpose(t: torch.Tensor) -> torch.Tensor:
    """t.t() laid out row-major (a copy)."""
    return t.t().contiguous()


def compiled_on_cuda(fn):
    """fn, fused by torch.compile for CUDA tensors (ATen's FP8 copies and casts are several
    full-size passes, unvectorised); eager for others. Compiled on first use."""
    compiled = None

    @functools.wraps(fn)
    def run(t: torch.Tensor, *args):
        nonlocal compiled
        if not t.is_cuda:
            return fn(t, *args)
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(t, *args)
    return run


quantize_fast, transpose_fast = compiled_on_cuda(quantize), compiled_on_cuda(transpose)


class _kept_weight_matmul(torch.autograd.Function):
    """input @ w8.t() * scales with the weight already in FP8; backward: grad_input only."""

    @staticmethod
    def forward(ctx, input_hp, w8, inv_w):
        ctx.save_for_backward(w8, inv_w)
        ctx.input_dtype = input_hp.dtype
        shape = input_hp.shape
        x8, inv_x = quantize_fast(input_hp.reshape(-1, shape[-1]), torch.float8_e4m3fn)
        out = torch._scaled_mm(x8, w8.t(), scale_a=inv_x, scale_b=inv_w, out_dtype=input_hp.dtype,
                               use_fast_accum=True)    # torchao's setting for the output GEMM
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        w8, inv_w = ctx.saved_tensors
        shape = grad_output.shape
        g8, inv_g = quantize_fast(grad_output.reshape(-1, shape[-1]), torch.float8_e5m2)
        # grad_input = grad_output @ w: cuBLAS wants the second operand column-major, i.e. w.t() stored row-major
        grad_input = torch._scaled_mm(g8, transpose_fast(w8).t(), scale_a=inv_g, scale_b=inv_w,
                                      out_dtype=ctx.input_dtype)
        return grad_input.reshape(*shape[:-1], grad_input.shape[-1]), None, None


def _cast(t, cast_config, mm_config, role, dim, config):
    return hp_tensor_to_float8_dynamic(
        t, cast_config.target_dtype, mm_config, gemm_input_role=role,
        scaling_granularity=cast_config.scaling_granularity,
        axiswise_dim=get_maybe_axiswise_dim(dim, cast_config.scaling_granularity),
        round_scales_to_power_of_2=config.round_scales_to_power_of_2)


@torch._dynamo.allow_in_graph
class _frozen_matmul(torch.autograd.Function):
    """input @ weight_t in FP8 with torchao's casts every call (any recipe); backward: grad_input only."""

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


@functools.cache
def tensorwise(config) -> bool:
    """The config casts input, weight and output gradient with one scale per tensor in e4m3/e4m3/e5m2
    (torchao's "tensorwise" recipe), which the kept-weight path reproduces; emulation is torchao's."""
    casts = (config.cast_config_input, config.cast_config_weight, config.cast_config_grad_output)
    return (not config.emulate and all(c.scaling_granularity is ScalingGranularity.TENSORWISE for c in casts)
            and [c.target_dtype for c in casts] == [torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e5m2])


class FrozenFloat8Linear(Float8Linear):
    """Float8Linear for a weight that never trains (requires_grad False); falls back to
    Float8Linear's own matmul if the weight is ever unfrozen."""

    @torch._dynamo.disable   # its storage/version check is Python; under train.compile it runs eagerly
    def kept_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight in FP8 (e4m3, its own row-major layout) and its inverse scale, made again
        only when the weight was written in place or replaced since."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        kept = self.__dict__.get("_fp8_kept")
        if kept is None or kept[0] != key:
            with torch.no_grad():
                w8, inv = quantize(w, torch.float8_e4m3fn)
            self.__dict__["_fp8_kept"] = kept = (key, w8, inv)    # not a buffer: state dicts and .to() ignore it
        return kept[1], kept[2]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return super().forward(input)
        if torch.is_autocast_enabled():
            input = input.to(torch.get_autocast_gpu_dtype())
        if tensorwise(self.config):
            output = _kept_weight_matmul.apply(input, *self.kept_weight())
        else:
            output = _frozen_matmul.apply(input, self.weight.t(), self.linear_mm_config, self.config)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output
