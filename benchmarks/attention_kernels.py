"""Which attention kernel is fastest here, per length (issue 26 item 3): forward + backward of causal
attention, Llama-3 8B's heads (32 query heads, 8 key/value heads, head dim 128), bf16, through
torch's scaled_dot_product_attention with one backend forced at a time, and flash-attn's
flash_attn_func where that package is installed. One JSON line per (length, kernel).

    python benchmarks/attention_kernels.py --lengths 2048x4,32768x1,131072x1
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048x4,32768x1", help="SEQxBATCH,...")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    dev = torch.device("cuda")
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except ImportError:
        flash_attn_func = None
    for spec in a.lengths.split(","):
        seq, batch = (int(x) for x in spec.split("x"))
        q = torch.randn(batch, a.heads, seq, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, a.kv_heads, seq, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        flops = 4 * batch * a.heads * seq * seq * a.head_dim / 2 * 3.5  # causal fwd (2 matmuls) + bwd (5): x3.5
        iters = max(3, min(50, int(2e14 / flops)))
        for name, backend in BACKENDS.items():
            def step():
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                out.backward(torch.ones_like(out))
            try:
                ms = timed(step, iters)
                print(json.dumps({"check": "attention", "kernel": f"sdpa-{name}", "seq": seq, "batch": batch,
                                  "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}), flush=True)
            except RuntimeError as e:
                print(json.dumps({"check": "attention", "kernel": f"sdpa-{name}", "seq": seq, "batch": batch,
                                  "error": str(e).splitlines()[0][:200]}), flush=True)
            q.grad = k.grad = v.grad = None
        if flash_attn_func is not None:
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

            def fa():
                out = flash_attn_func(qt, kt, vt, causal=True)
                out.backward(torch.ones_like(out))
            ms = timed(fa, iters)
            print(json.dumps({"check": "attention", "kernel": "flash_attn", "seq": seq, "batch": batch,
                              "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
