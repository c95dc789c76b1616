"""Issue 13 item 3: peak RSS increase of writing RUN_DIR/final: old path (consolidated 16-bit state dict on rank 0 +
save_pretrained) vs new (save_final streaming), and the offline export from a ZeRO-3 checkpoint.
One gloo process, ZeRO-3, a random Llama (~370M params, fp32) on CPU.
usage: MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/export_memory.py WORK old|new|offline [SHARD_BYTES]
(also under `python -m torch.distributed.run --standalone --nproc_per_node=2`: every rank gathers,
rank 0 writes and measures; the malloc settings return freed memory to the OS, so RSS shows it)"""
import json, os, shutil, sys, threading, time
from pathlib import Path
import torch
work, mode = Path(sys.argv[1]), sys.argv[2]
shard = int(sys.argv[3]) if len(sys.argv) > 3 else 200_000_000
work.mkdir(parents=True, exist_ok=True)

def rss():
    f = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return {k: int(f[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

class Peak:
    def __enter__(self):
        self.base, self.peak, self.stop = rss(), rss(), False
        def run():
            while not self.stop:
                now = rss()
                self.peak = {k: max(self.peak[k], now[k]) for k in now}
                time.sleep(0.005)
        self.t = threading.Thread(target=run, daemon=True); self.t.start(); self.t0 = time.perf_counter()
        return self
    def __exit__(self, *a):
        self.stop = True; self.t.join(); self.secs = time.perf_counter() - self.t0
        if rank == 0: print(f"{mode}: {self.secs:.1f}s, peak increase VmRSS {(self.peak['VmRSS']-self.base['VmRSS'])/2**20:.0f} MiB "
              f"(anon {(self.peak['RssAnon']-self.base['RssAnon'])/2**20:.0f} MiB, file {(self.peak['RssFile']-self.base['RssFile'])/2**20:.0f} MiB)", flush=True)

import deepspeed, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import STORIES, base_recipe
from zerotune.core.recipe_load import validate_recipe
if "RANK" not in os.environ:   # one process; under torchrun: every rank gathers, rank 0 writes and measures
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + os.getpid() % 1000))
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
mdir = work / "model"
if not (mdir / "config.json").is_file():
    cfg.save_pretrained(mdir)
    for f in STORIES.iterdir():
        if "token" in f.name: shutil.copy(f, mdir / f.name)
recipe = validate_recipe(base_recipe(work, model={"path": str(mdir), "tokenizer": str(STORIES), "dtype": "fp32", "chat_template": None}))
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
n = sum(p.numel() for p in model.parameters())
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
params = list(model.parameters())
engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds, optimizer=torch.optim.SGD(params, lr=0.1))
if rank == 0: print(f"{n/1e6:.0f}M parameters, {n*4/2**20:.0f} MiB in fp32; largest tensor {max(p.ds_numel for p in params)*4/2**20:.0f} MiB; shard {shard/2**20:.0f} MiB", flush=True)
out = work / f"final-{mode}"
shutil.rmtree(out, ignore_errors=True)
if mode == "old":
    with Peak():
        sd = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            model.save_pretrained(out, state_dict=sd, safe_serialization=True)
        del sd
elif mode == "new":
    from zerotune.training.export.write import save_final
    with Peak():
        save_final(engine, model, recipe, out, rank, max_shard_size=shard)
else:
    from zerotune.training.export.write import export_checkpoint
    run = work / "runs" / "t"
    ck = run / "checkpoints"
    if not (ck / "step-000001").is_dir():
        engine.save_checkpoint(str(ck), tag="step-000001", save_latest=False)
    del engine, model, params
    import gc; gc.collect()
    with Peak():
        export_checkpoint(recipe, ck / "step-000001", out, max_shard_size=shard, run_dir=run, force=True)
if rank == 0: print("files:", sorted(p.name for p in out.iterdir() if "safetensors" in p.name)[:3], "...", len(list(out.glob("*.safetensors"))), "shards")
dist.destroy_process_group()
