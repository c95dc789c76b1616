"""Issue 13 item 1, step 2: time the old conversion (ds_to_universal, 1/1 workers, subprocess) vs training/reshard.to_universal
on one gloo process, and compare every output file. usage: python benchmarks/reshard_time.py CKPT (from benchmarks/reshard_checkpoint.py)"""
import os, shutil, subprocess, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
ckpt = Path(sys.argv[1])
old = Path(str(ckpt) + ".old-universal")
shutil.rmtree(old, ignore_errors=True); old.mkdir()
cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
       "--output_folder", str(old / ckpt.name), "--num_extract_workers", "1", "--num_merge_workers", "1"]
t = time.perf_counter(); subprocess.run(cmd, check=True, capture_output=True); t_old = time.perf_counter() - t
print(f"old (ds_to_universal 1/1 workers, subprocess): {t_old:.1f}s")
shutil.rmtree(ckpt / "universal", ignore_errors=True)
dist.init_process_group("gloo", init_method=f"file://{ckpt.parent}/pg-{os.getpid()}", rank=0, world_size=1)
from zerotune.training.checkpoint.reshard import to_universal
t = time.perf_counter(); new = to_universal(ckpt, 0, 1, 1); t_new = time.perf_counter() - t
print(f"new (reshard.to_universal, 1 rank): {t_new:.1f}s")
t = time.perf_counter(); to_universal(ckpt, 0, 1, 1); print(f"second call (cached): {time.perf_counter() - t:.3f}s")
print((ckpt / "universal" / "parts" / "0.log").read_text().strip().splitlines()[-1])
a = sorted(p.relative_to(old / ckpt.name) for p in (old / ckpt.name).rglob("*") if p.is_file())
b = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
print("only old:", set(a) - set(b), "only new:", set(b) - set(a))
for rel in a:
    if rel.name.endswith(".pt") and rel.parts[0] == "zero" and rel.name != "optimizer_state.pt":
        x, y = torch.load(old / ckpt.name / rel, weights_only=False), torch.load(new / rel, weights_only=True)
        assert torch.equal(x, y) and x.dtype == y.dtype, rel
print("all zero/<param>/*.pt equal")
x = torch.load(old / ckpt.name / "zero/optimizer_state.pt", weights_only=False)
y = torch.load(new / "zero/optimizer_state.pt", weights_only=False)
print("optimizer_state keys old", sorted(x), "\n new", sorted(y))
dist.destroy_process_group()
