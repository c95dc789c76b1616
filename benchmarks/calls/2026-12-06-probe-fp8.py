"""Probe for issue 26 (device call A, 2026-12-06): does torchao's float8 training pay for one
decoder layer's linear layers (q/k/v/o, gate/up/down) at Llama 1B and 8B shapes? Forward + backward,
bf16 vs float8 (tensorwise, rowwise), eager and torch.compile, weights trainable (full fine-tune)
or frozen (the LoRA base). One JSON line per case."""
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linears(nn.Module):
    def __init__(self, h, kv, inter):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(h, h, bias=False), nn.Linear(h, kv, bias=False), \
            nn.Linear(h, kv, bias=False), nn.Linear(h, h, bias=False)
        self.gate, self.up, self.down = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False), \
            nn.Linear(inter, h, bias=False)

    def forward(self, x):
        y = self.o(self.q(x)) + self.k(x).sum() * 0 + self.v(x).sum() * 0
        return self.down(F.silu(self.gate(y)) * self.up(y))


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def main():
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    shapes = {"1b": (2048, 512, 8192), "8b": (4096, 1024, 14336)}
    cases = [("1b", 2048 * 8), ("8b", 2048 * 4), ("8b", 32768)]
    for size, tokens in cases:
        h, kv, inter = shapes[size]
        x0 = torch.randn(1, tokens, h, device="cuda", dtype=torch.bfloat16)
        for frozen in (False, True):
            base = None
            for recipe in ("bf16", "tensorwise", "rowwise"):
                for compiled in (False, True):
                    torch.manual_seed(0)
                    m = Linears(h, kv, inter).cuda().to(torch.bfloat16)
                    if frozen:
                        m.requires_grad_(False)
                    if recipe != "bf16":
                        convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name(recipe))
                    f = torch.compile(m) if compiled else m
                    x = x0.clone().requires_grad_(True)

                    def step():
                        f(x).sum().backward()
                    try:
                        ms = bench(step)
                    except Exception as ex:  # noqa: BLE001
                        print(json.dumps({"size": size, "tokens": tokens, "frozen": frozen, "recipe": recipe,
                                          "compile": compiled, "error": str(ex).splitlines()[0][:200]}), flush=True)
                        continue
                    if recipe == "bf16" and not compiled:
                        base = ms
                    print(json.dumps({"size": size, "tokens": tokens, "frozen": frozen, "recipe": recipe,
                                      "compile": compiled, "ms": round(ms, 3),
                                      "speedup_vs_bf16_eager": round(base / ms, 3) if base else None}), flush=True)
                    del m, f, x
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
