"""benchmarks/bench.py (the one benchmark command) and benchmarks/peer_hf.py's data mode, on CPU:
the commands --dry-run lists, the recipes and variant overrides against the schema, the
metrics.jsonl parser, the results summary and README table, the package shim, stopping a run
after its last step, the peer's collation of real chat data, and (slow) one real tiny
`zerotune train` run through bench.py."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


def run_bench(*args, timeout=120, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, **kw)


def dry_run(*args) -> tuple[list[list[str]], str]:
    """(argv of every `$ ` line, the whole output)."""
    proc = run_bench("--dry-run", "--work-dir", "/tmp/zb-dry", *args)
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(ln[2:].split("   #")[0]) for ln in proc.stdout.splitlines() if ln.startswith("$ ")]
    return cmds, proc.stdout


def _after(argv: list[str], *seq: str) -> bool:
    """`seq` appears in `argv` as a contiguous run."""
    n = len(seq)
    return any(argv[i:i + n] == list(seq) for i in range(len(argv) - n + 1))


# ----------------------------------------------------------------------------- --dry-run
def test_dry_run_lists_every_command():
    cmds, out = dry_run("--only", "full-1b,full-1b-offload,lora-8b,qlora-8b,full-8b,chat-sharegpt",
                        "--machine-gpus", "4")
    makes = [c for c in cmds if "_make-model" in c]
    assert [c[c.index("_make-model") + 1] for c in makes] == ["1b", "8b"]
    zt = [c for c in cmds if _after(c, "-m", "zerotune.launcher.cli", "train")]
    peer = [c for c in cmds if "benchmarks/peer_hf.py" in c]
    assert len(zt) == sum(len(bench.VARIANTS[w]) for w in ("full-1b", "full-1b-offload", "lora-8b", "qlora-8b",
                                                             "full-8b", "chat-sharegpt"))
    assert len(peer) == 6 * len(bench.PEER_SETTINGS)
    for c in zt + peer:
        assert c[0] == sys.executable
    # zerotune: the workload's recipe, its GPU count, one run name per variant, the variant's --set
    full1b = [c for c in zt if c[4].endswith("/recipes/full-1b.yaml")]
    assert all(_after(c, "--nproc", "1") for c in full1b)
    assert {c[c.index("--set") + 1] for c in full1b} == {f"name=full-1b--{v}" for v in bench.VARIANTS["full-1b"]}
    nogc = next(c for c in full1b if "name=full-1b--zero2-no-gc" in c)
    assert _after(nogc, "--set", "distributed.zero=2") and _after(nogc, "--set", "train.gradient_checkpointing=false")
    assert all(_after(c, "--nproc", "4") for c in zt if c[4].endswith("/recipes/full-8b.yaml"))
    # the peer through torchrun, with each setting's flags
    p1b = [c for c in peer if _after(c, "full", "--size", "1b", "--seq", "2048", "--mbs", "8") and "--data" not in c]
    assert len(p1b) == 2 * len(bench.PEER_SETTINGS)  # full-1b and full-1b-offload
    assert all(_after(c, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1") for c in p1b)
    assert sum("--offload" in c for c in p1b) == len(bench.PEER_SETTINGS)
    assert sorted(tuple(x for x in c if x in ("--liger", "--no-gc", "--plain")) for c in p1b if "--offload" not in c) == \
        sorted(tuple(v) for v in bench.PEER_SETTINGS.values())
    assert all(_after(c, "--steps", "12", "--warmup", "4") for c in peer)
    lora = [c for c in peer if _after(c, "lora", "--size", "8b")]
    assert lora and all("--model-dir" in c and c[c.index("--model-dir") + 1].endswith("llama3-8b-random") for c in lora)
    assert all(_after(c, "--nproc_per_node", "4") for c in peer if _after(c, "full", "--size", "8b"))
    chat = [c for c in peer if "--data" in c]
    assert chat and all(_after(c, "--data", bench.SHAREGPT, "--format", "sharegpt", "--tokenizer", bench.TOKENIZER,
                               "--max-len", "2048") for c in chat)
    assert "# chat-sharegpt: 1 GPU(s)" in out


def test_dry_run_filters_and_extra_settings():
    cmds, out = dry_run("--only", "full-1b,full-8b", "--variants", "default", "--peer-settings", "default,liger",
                        "--variant", "z1=distributed.zero=1 train.gradient_checkpointing=false",
                        "--peer-setting", "mbs4=--mbs 4", "--machine-gpus", "1", "--steps", "6", "--warmup", "2")
    assert "# full-8b: skipped: needs 4 GPUs" in out
    zt = [c for c in cmds if "zerotune.launcher.cli" in c]
    assert [c[c.index("--set") + 1] for c in zt] == ["name=full-1b--default", "name=full-1b--z1"]
    assert _after(zt[1], "--set", "distributed.zero=1", "--set", "train.gradient_checkpointing=false")
    peer = [c for c in cmds if "benchmarks/peer_hf.py" in c]
    assert len(peer) == 3 and peer[1][-1] == "--liger" and peer[2][-2:] == ["--mbs", "4"]
    assert all(_after(c, "--steps", "6", "--warmup", "2") for c in peer)
    cmds, _ = dry_run("--only", "full-1b", "--peer-settings", "none", "--variants", "no-gc")
    assert not any("benchmarks/peer_hf.py" in c for c in cmds)
    assert len([c for c in cmds if "zerotune.launcher.cli" in c]) == 1
    bad = run_bench("--dry-run", "--only", "full-2b")
    assert bad.returncode != 0 and "unknown workload" in bad.stderr


def test_recipes_and_variants_validate(tmp_path):
    """Every workload's recipe, with each of its variants' overrides, is a valid recipe."""
    from zerotune.core.recipe_load import load_recipe
    a = bench.parser().parse_args(["--work-dir", str(tmp_path)])
    a.variant, a.peer_setting = {}, {}
    plan = bench.Plan(a, 4)
    for wl in bench.WORKLOADS:
        path = tmp_path / f"{wl}.yaml"
        path.write_text(json.dumps(plan.recipe(wl)))
        for name, sets in plan.variants(wl).items():
            r = load_recipe(path, [f"name={plan.run_name(wl, name)}", *sets], check_paths=False)
            padded = "data.packing=false" in sets   # chat-lora-8b's padded variant
            unpacked = padded or bench.WORKLOADS[wl].get("packing") is False   # 512k: one document a row
            assert r.train.max_steps == 12 and r.data.packing is not unpacked and r.checkpoint.save_final is False
            assert r.model.tokenizer.endswith("phi-3-mini")
            assert r.train.micro_batch_size == (16 if padded else bench.WORKLOADS[wl]["mbs"])
    off = load_recipe(tmp_path / "full-1b-offload.yaml", check_paths=False)
    assert off.distributed.offload_optimizer and off.distributed.offload_params and off.distributed.zero == 3
    q = load_recipe(tmp_path / "qlora-8b.yaml", check_paths=False)
    assert q.method.kind == "qlora" and q.train.optimizer == "paged_adamw_8bit" and q.method.lora.r == 16


def test_chat_workload_runs_hf_trainer_and_trl(tmp_path):
    """chat-lora-8b (issue 26): LoRA 8B on the Alpaca demo repeated, packing on as a user writes it;
    HF Trainer's settings through peer_hf.py and TRL's (trl-*) through peer_trl.py, on the same
    data file; --size / --seq change the model and length of every selected workload."""
    cmds, out = dry_run("--only", "chat-lora-8b")
    recipe = json.loads(out.split("# chat-lora-8b: 1 GPU(s); recipe ")[1].split(" = ", 1)[1].splitlines()[0])
    data = "/tmp/zb-dry/data/alpaca_en_demo-x4.json"
    assert recipe["method"]["kind"] == "lora" and recipe["data"]["packing"] is True and recipe["model"]["chat_template"] is None
    assert recipe["data"]["train"] == [{"path": data, "format": "alpaca"}] and recipe["train"]["micro_batch_size"] == 4
    trl = [c for c in cmds if "benchmarks/peer_trl.py" in c]
    hf = [c for c in cmds if "benchmarks/peer_hf.py" in c]
    assert len(trl) == len(bench.TRL_SETTINGS) and len(hf) == len(bench.PEER_SETTINGS) + 1   # + liger-no-gc-mbs16
    assert all(name.startswith("trl-") for name in bench.TRL_SETTINGS)
    for c in trl + hf:
        assert _after(c, "--data", data, "--format", "alpaca", "--tokenizer", bench.TOKENIZER, "--max-len", "2048")
        assert _after(c, "lora", "--size", "8b") and c[c.index("--model-dir") + 1].endswith("llama3-8b-random")
    assert sorted(tuple(c[c.index("2048") + 1:]) for c in trl) == sorted(tuple(v) for v in bench.TRL_SETTINGS.values())
    assert any(_after(c, "--packing", "--liger", "--no-gc") for c in trl)
    assert any(_after(c, "--padding-free", "--liger", "--no-gc", "--mbs", "16") for c in trl)
    zt = [c for c in cmds if "zerotune.launcher.cli" in c]
    assert any(_after(c, "--set", "data.packing=false", "--set", "train.micro_batch_size=16") for c in zt)
    cmds, out = dry_run("--only", "chat-lora-8b", "--size", "tiny", "--seq", "256", "--peer-settings", "trl-packing")
    [peer] = [c for c in cmds if "benchmarks/peer_trl.py" in c]
    assert _after(peer, "benchmarks/peer_trl.py", "lora", "--size", "tiny") and _after(peer, "--max-len", "256")
    assert '"dtype": "fp32"' in out and '"max_len": 256' in out and "llama3-tiny-random" in out


def test_peer_trl_rows_and_real_tokens():
    """peer_trl.py's prompt-completion rows (the last assistant turn trains) and its real-token
    count: padded batches by the mask, padding-free ones by the runs of position_ids."""
    import torch

    import peer_trl
    row = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief"}
    pc = peer_trl.prompt_completion(row, "alpaca")
    assert pc["completion"] == [{"role": "assistant", "content": "5"}] and pc["prompt"][-1]["role"] == "user"
    flat = {"input_ids": torch.ones(1, 9, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])}
    assert peer_trl.sample_lengths(flat) == [3, 2, 4]
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    c = peer_trl.Counter()
    c.add(flat)
    c.add(padded)
    assert (c.real, c.padded, c.sq) == (9 + 7, 9 + 8, 9 + 4 + 16 + 9 + 16)


def test_sizes_are_the_peers_and_flops_agree():
    """One shape table for both sides (the peer imports bench_setup's), one peak FLOP/s table
    (core/flops.py), and zerotune's FLOP count (core/flops.py, train/mfu) equals the peer's
    6N + causal attention on them, so the MFUs compare."""
    import peer_hf
    from transformers import LlamaConfig

    from zerotune.core.flops import flops_per_token
    assert peer_hf.SIZES is bench.SIZES and set(bench.SIZES) >= {"tiny", "1b", "3b", "8b"}
    assert peer_hf.peak_flops() == 989e12   # no GPU here: the fallback, which is also H100/H200's entry
    for size in ("1b", "8b"):
        cfg = LlamaConfig(**peer_hf.SIZES[size], max_position_embeddings=4096, rope_theta=500000.0)
        for seq in (512, 2048):
            assert flops_per_token(cfg.to_dict(), seq) == peer_hf.flops_per_token(cfg, peer_hf.count_params(cfg), seq)


# ----------------------------------------------------------------------------- parsing and the table
def _metrics(path: Path, world: int, steps: int, tps, peak_gb, mfu=0.2) -> Path:
    lines = [{"time": 0, "step": 0, "event": "start", "total_steps": steps, "world_size": world}]
    for s in range(1, steps + 1):
        lines.append({"time": s, "step": s, "train/loss": 2.0, "train/tokens_per_sec": tps(s), "train/mfu": mfu,
                      "time/step_s": 0.5, "train/gpu_mem_peak_gb": peak_gb(s), "data/packing_efficiency": 0.97,
                      "train/host_rss_peak_gib": 3.0 + s / 10})
    lines.insert(3, {"time": 1, "step": 2, "event": "checkpoint", "path": "x"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"time": 9, "step": 13, "train/lo')  # a cut line
    return path


def test_parse_metrics(tmp_path):
    # warm-up steps 1-4 are slow; per GPU = global / world; GB (1e9) -> GiB
    f = _metrics(tmp_path / "m.jsonl", world=4, steps=12, tps=lambda s: 1000.0 if s <= 4 else 40000.0 + s,
                 peak_gb=lambda s: 40.0 + s)
    m = bench.parse_metrics(f, warmup=4)
    assert m["tok_s_gpu"] == round((40000 + 8.5) / 4)
    assert m["timed_steps"] == 8 and m["world"] == 4 and m["last_step"] == 12
    assert m["peak_gib"] == round(52e9 / 2 ** 30, 2) and m["mfu"] == 0.2 and m["packing_efficiency"] == 0.97
    assert m["host_rss_peak_gib"] == 4.2   # the largest of the run, warm-up included
    assert bench.last_step(f) == 12
    with pytest.raises(ValueError, match="no train steps"):
        bench.parse_metrics(f, warmup=12)
    cpu = _metrics(tmp_path / "c.jsonl", world=1, steps=3, tps=lambda s: 10.0, peak_gb=lambda s: None, mfu=None)
    m = bench.parse_metrics(cpu, warmup=1)
    assert m["tok_s_gpu"] == 10 and m["peak_gib"] is None and m["mfu"] is None



def test_parse_metrics_keeps_the_loss_curve(tmp_path):
    """Issue 26: a run's row carries every step's loss (warm-up steps too), so a bf16 and an fp8
    variant of one workload can be compared step by step."""
    f = _metrics(tmp_path / "m.jsonl", world=1, steps=5, tps=lambda s: 100.0, peak_gb=lambda s: 1.0)
    assert bench.parse_metrics(f, warmup=2)["losses"] == [2.0] * 5


def test_parse_metrics_reads_gib_and_zerotune_keeps_the_old_gb_keys(tmp_path):
    """Runs from 2026-12 log train/gpu_mem_*_gib (GiB); metrics.jsonl also keeps the old _gb keys
    (1e9-byte GB) for one release: both give the same peak."""
    from zerotune.training.monitoring.throughput import with_old_memory_keys
    rec = with_old_memory_keys({"train/gpu_mem_peak_gib": 40.0, "train/loss": 2.0})
    assert rec["train/gpu_mem_peak_gb"] == 40.0 * 2 ** 30 / 1e9 and rec["train/loss"] == 2.0
    lines = [{"step": 0, "event": "start", "total_steps": 3, "world_size": 1}] + [
        {"step": s, "train/tokens_per_sec": 10.0, "time/step_s": 0.5, "train/gpu_mem_peak_gib": 40.0 + s} for s in (1, 2, 3)]
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert bench.parse_metrics(f, warmup=1)["peak_gib"] == 43.0


def _run(side, name, tok=None, peak=30.0, mfu=0.25, error=None):
    if tok is None:
        return {"side": side, "name": name, "ok": False, "error_kind": error or "OOM", "error": "CUDA out of memory"}
    return {"side": side, "name": name, "ok": True, "tok_s_gpu": tok, "mfu": mfu, "peak_gib": peak}


def test_summary_and_table(tmp_path):
    zt = [_run("zerotune", "default", 30000, 44.1), _run("zerotune", "unfused-loss", 28000),
          _run("zerotune", "no-gc", 36000, 60.2, 0.3), _run("zerotune", "zero2-no-gc")]
    peer = [_run("peer", "default", 28000, 44.1), _run("peer", "no-gc"), _run("peer", "liger", 27000, 25.0),
            _run("peer", "liger-no-gc", 32000, 38.8)]
    line = bench.summarize("full-1b", "NVIDIA H100 80GB HBM3", 1, zt, peer, {"seq": 2048})
    assert set(bench.RESULT_KEYS) <= set(line)
    assert (line["zerotune_tok_s_gpu"], line["zerotune_variant"], line["zerotune_peak_gib"]) == (36000, "no-gc", 60.2)
    assert line["zerotune_default_tok_s_gpu"] == 30000 and line["zerotune_mfu"] == 0.3
    assert (line["peer_best_tok_s_gpu"], line["peer_best_setting"], line["peer_best_peak_gib"]) == (32000, "liger-no-gc", 38.8)
    assert line["peer_default_tok_s_gpu"] == 28000
    assert line["ratio_default"] == round(36000 / 28000, 3) and line["ratio_best"] == round(36000 / 32000, 3)
    assert line["peer_settings"]["no-gc"]["error"] == "OOM" and line["zerotune_variants"]["no-gc"]["tok_s_gpu"] == 36000
    failed = bench.summarize("full-8b", "NVIDIA H100 80GB HBM3", 4, [_run("zerotune", "default")], [], {})
    assert failed["zerotune_tok_s_gpu"] is None and failed["ratio_best"] is None and failed["peer_best_setting"] is None

    results = tmp_path / "r.jsonl"
    bench.merge_results(results, [line, failed])
    bench.merge_results(results, [dict(failed, gpus=8)])  # a later call replaces the workload's line
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["workload"] for x in lines] == ["full-1b", "full-8b"] and lines[1]["gpus"] == 8
    proc = run_bench("table", str(results))
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| workload | GPUs | zerotune tok/s/GPU (variant) | MFU | peak GiB |")
    assert rows[1] == ("| full-1b | 1 | 36,000 (no-gc) | 30.0% | 60.2 | 28,000 | 32,000 (liger-no-gc) | 38.8 | "
                       "1.29x | 1.12x |")
    assert rows[2].startswith("| full-8b | 8 | failed (OOM) | - |")
    assert "NVIDIA H100 80GB HBM3" in proc.stdout


def test_device_slug_and_errors(tmp_path):
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert bench.device_slug("NVIDIA H200") == "h200"
    log = tmp_path / "x.log"
    log.write_text("start\nUserWarning: something\nTraceback (most recent call last):\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n\n")
    tail = bench.error_tail(log)
    assert "UserWarning" not in tail and tail.endswith("Tried to allocate 2.00 GiB") and bench.is_oom(tail)


def test_peer_result_line(tmp_path):
    log = tmp_path / "p.log"
    log.write_text('noise\n[rank0]: RESULT {"tok_s_gpu": 100, "real_tok_s_gpu": 90, "peak_gib": 1.5}\nW1127 exit\n')
    assert bench.parse_peer(log)["real_tok_s_gpu"] == 90


# ----------------------------------------------------------------------------- the package shim, stopping a run
def test_package_shim_makes_zerotune_importable(tmp_path):
    pkg = bench.make_package(tmp_path / "pkg")
    bench.make_package(tmp_path / "pkg")  # idempotent
    # without site-packages (no editable install): the torch-free core resolves from the shim alone
    code = "import zerotune.core.layout as l, zerotune.core.flops as f; print(l.__file__); print(f.__file__)"
    proc = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(pkg)!r}); {code}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith(str(pkg / "zerotune")) for line in proc.stdout.split())
    # with the bench's environment: the shim comes before any installed copy, templates included
    code = ("import zerotune.launcher.cli, zerotune.training.data.loader as d, zerotune.launcher.ds_config as c; "
            "print(zerotune.launcher.cli.__file__); print(d.__file__); print(c.TEMPLATES / 'zero3.json')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=bench.child_env(pkg, {"PYTHONWARNINGS": "ignore"}))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    assert all(x.startswith(str(pkg / "zerotune")) for x in out[:2]), out
    assert Path(out[-1]).is_file()  # templates found through the symlinks (ds_config.py resolves its __file__)


def test_run_command_stops_the_whole_tree(tmp_path):
    marker = tmp_path / "done"
    # a parent whose child runs in a new session (as torchrun starts its workers)
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '300'], start_new_session=True); "
              f"open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid)); time.sleep(1); "
              f"open({str(marker)!r}, 'w').close(); time.sleep(300)")
    r = bench.run_command([sys.executable, "-c", script], tmp_path / "log", dict(os.environ), timeout=60,
                          done=marker.exists)
    assert r["state"] == "stopped-after-last-step" and r["wall_s"] < 30
    child = int((tmp_path / "pid").read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    r = bench.run_command([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log2", dict(os.environ),
                          timeout=2)
    assert r["state"] == "timeout" and r["rc"] != 0
    r = bench.run_command([sys.executable, "-c", "print('hi')"], tmp_path / "log3", dict(os.environ), timeout=60)
    assert r == {"rc": 0, "state": "exited", "wall_s": r["wall_s"]}
    assert (tmp_path / "log3").read_text().splitlines()[-1] == "hi"


# ----------------------------------------------------------------------------- the peer's data mode
PHI3 = ROOT / "examples" / "tokenizers" / "phi-3-mini"


@pytest.mark.parametrize("path,fmt", [("examples/data/alpaca/alpaca_en_demo.json", "alpaca"),
                                      ("examples/data/sharegpt/dummy_conversation.json", "sharegpt")])
def test_peer_data_mode_collation(path, fmt):
    import peer_hf
    tok = peer_hf.load_tokenizer(str(PHI3))
    ds = peer_hf.ChatRows(str(ROOT / path), fmt, tok, max_len=2048)
    rows = json.loads((ROOT / path).read_text())
    assert len(ds) == len(rows)
    # the chat template rendered the row: the first sample is exactly the template's tokens
    text = tok.apply_chat_template(peer_hf.to_messages(rows[0], fmt), tokenize=False)
    assert ds[0]["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert text.startswith("<|user|>") and "<|assistant|>" in text
    samples = [ds[i] for i in range(8)]
    lens = [len(s["input_ids"]) for s in samples]
    batch = peer_hf.collator(tok)(samples)
    B, T = batch["input_ids"].shape
    assert (B, T) == (8, max(lens)) and min(lens) < T  # padded to the longest of this batch, not max_len
    mask = batch["attention_mask"]
    assert mask.sum(1).tolist() == lens and all(mask[i, :n].all() and not mask[i, n:].any() for i, n in enumerate(lens))
    assert ((batch["labels"] == -100) == (mask == 0)).all()  # labels -100 exactly on padding (right side)
    assert (batch["labels"][mask == 1] == batch["input_ids"][mask == 1]).all()
    c = peer_hf.Counter()
    c.add(batch)
    assert c.real == int(mask.sum()) == sum(lens) and c.padded == B * T and c.sq == sum(n * n for n in lens)


def test_peer_truncates_to_max_len():
    import peer_hf
    tok = peer_hf.load_tokenizer(str(PHI3))
    ds = peer_hf.ChatRows(str(ROOT / "examples/data/alpaca/alpaca_en_demo.json"), "alpaca", tok, max_len=64)
    assert max(len(r) for r in ds.rows) == 64
    m = peer_hf.to_messages({"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief"}, "alpaca")
    assert m == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Add\n\n2 and 3"},
                 {"role": "assistant", "content": "5"}]


# ----------------------------------------------------------------------------- one real run (CPU)
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_zerotune_run_through_bench(tmp_path):
    """`zerotune train` on the tiny shape, through bench.py's shim, data, recipe, stop and parser."""
    proc = run_bench("--only", "tiny", "--variants", "default", "--steps", "4", "--warmup", "1",
                     "--work-dir", str(tmp_path / "w"), "--results", str(tmp_path / "res"), timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results] = list((tmp_path / "res").glob("*-cpu.jsonl"))
    [line] = [json.loads(x) for x in results.read_text().splitlines()]
    assert line["workload"] == "tiny" and line["zerotune_variant"] == "default" and line["zerotune_tok_s_gpu"] > 0
    assert line["peer_best_tok_s_gpu"] is None and line["device"] == "cpu" and line["gpus"] == 1
    [run] = [json.loads(x) for x in (tmp_path / "res" / results.name.replace(".jsonl", "-runs.jsonl")).read_text().splitlines()]
    assert run["ok"] and run["timed_steps"] == 3 and run["last_step"] == 4 and run["world"] == 1
    assert run["packing_efficiency"] == 1.0  # each random-words row fills max_len exactly
    assert "-m zerotune.launcher.cli train" in run["cmd"]
    assert not (Path(run["run_dir"]) / "checkpoints").exists()
    log = Path(run["log"]).read_text()
    assert "1 process(es)" in log and "truncated" in log


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_chat_workload_against_trl_on_cpu(tmp_path):
    """chat-lora-8b at the tiny shape on CPU: `zerotune train` (LoRA, packing on) and TRL's SFTTrainer
    (trl-packing: Liger is CUDA-only), both counting real tokens, in one results line."""
    proc = run_bench("--only", "chat-lora-8b", "--size", "tiny", "--seq", "256", "--variants", "default",
                     "--peer-settings", "trl-packing", "--steps", "3", "--warmup", "1",
                     "--work-dir", str(tmp_path / "w"), "--results", str(tmp_path / "res"), timeout=1480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results] = list((tmp_path / "res").glob("*-cpu.jsonl"))
    [line] = [json.loads(x) for x in results.read_text().splitlines()]
    assert line["workload"] == "chat-lora-8b" and line["size"] == "tiny" and line["seq"] == 256
    assert line["zerotune_tok_s_gpu"] > 0 and line["peer_trl_best_setting"] == line["peer_best_setting"] == "trl-packing"
    assert line["peer_trl_best_tok_s_gpu"] > 0 and line["ratio_best_trl"] == line["ratio_best"]
    runs = [json.loads(x) for x in (tmp_path / "res" / results.name.replace(".jsonl", "-runs.jsonl")).read_text().splitlines()]
    zt, peer = [r for r in runs if r["side"] == "zerotune"], [r for r in runs if r["side"] == "peer"]
    assert zt[0]["ok"] and zt[0]["timed_steps"] == 2
    res = peer[0]["result"]
    assert res["peer"] == "trl-sft" and res["packing"] and res["padding_free"] and res["timed_steps"] == 2
    assert res["tok_s_gpu"] == res["real_tok_s_gpu"] > 0 and res["pad_fraction"] == 0.0 and res["max_len"] == 256
    log = Path(zt[0]["log"]).read_text()
    assert "zerotune: packing on (data.packing: true)" in log and "planned for micro-batches of 4 x " in log
