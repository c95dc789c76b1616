"""Issue 29 Part A on CPU: what ZeRO-3's per-module hooks cost a step, and what gathering by the
decoder layer (training/model/build.py whole_layers_as_zero3_leaves) saves. A tiny Llama (hidden
64, --layers layers), DeepSpeed on gloo, batch 1 x 32 tokens, 25 steps (median of the last 20):
the compute is tiny, so the step is the host's bookkeeping, which a GPU step pays too.

    python benchmarks/zero3_hooks_cpu.py --layers 16 [--gc] [--lora]                  # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/zero3_hooks_cpu.py --layers 16

One JSON row per run on rank 0: {"check": "zero3_hooks_cpu", "world", "run" (z0 | z3 | z3-leaf),
"method" (full | lora), "layers", "gc", "step_ms", "last_loss"}. z3 keeps every parameter whole in one process (as
launcher/ds_config.py does); with several, the usual 10 x hidden threshold. z3-leaf makes each
decoder layer a ZeRO-3 leaf in both cases (the product does it only where every parameter is
whole: with several processes this row measures what it would save there)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                   ("LOCAL_RANK", "0")):
    os.environ.setdefault(key, value)

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def run(name: str, layers: int, gc: bool, world: int, lora: bool = False) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    zero = {"stage": 0}
    if name != "z0":
        zero = {"stage": 3, "stage3_param_persistence_threshold": 10 ** 12 if world == 1 else 640}
    if name == "z3-leaf":
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, [type(model.model.layers[0])])
    if lora:   # adapters on every linear of the layers, added after the leaves, as build_model does
        from peft import LoraConfig, get_peft_model
        from zerotune.training.model.build import leaf_inputs_need_grad
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
        leaf_inputs_need_grad(model)
    params = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3),
                                      config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
                                              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9})
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    times, loss = [], None
    for _ in range(25):
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    return {"check": "zero3_hooks_cpu", "world": world, "run": name, "method": "lora" if lora else "full",
            "layers": layers, "gc": gc,
            "step_ms": round(1000 * statistics.median(times[5:]), 1), "last_loss": round(loss.item(), 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--runs", default="z0,z3,z3-leaf")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing on")
    p.add_argument("--lora", action="store_true", help="LoRA (r 8) on every linear of the layers")
    a = p.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    world = torch.distributed.get_world_size()
    for name in a.runs.split(","):
        row = run(name, a.layers, a.gc, world, a.lora)
        if torch.distributed.get_rank() == 0:
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
