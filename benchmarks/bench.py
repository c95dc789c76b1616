"""One benchmark command: zerotune (through `zerotune train`, the path users run) beside the
HF Trainer peer (benchmarks/peer_hf.py in each of its settings), workload by workload, in one
GPU call.

    python3 benchmarks/bench.py --only full-1b                      # one workload, every variant and peer setting
    python3 benchmarks/bench.py --only full-1b,lora-8b --variants default --peer-settings default,no-gc
    python3 benchmarks/bench.py --dry-run                            # print every command, run nothing
    python3 benchmarks/bench.py table benchmarks/results/2026-11-27-h100-80gb-hbm3.jsonl   # the README table

zerotune runs as `python -m zerotune.launcher.cli train RECIPE --nproc G --set ...` (data
loader, loop, metrics: RUN_DIR/metrics.jsonl is what is measured); a temporary folder of
symlinks makes `zerotune` importable from this checkout without installing it. The peer runs
as `python -m torch.distributed.run --standalone --nproc_per_node G benchmarks/peer_hf.py ...`
(torchrun). Models are random-initialised Llama-3 shapes (peer_hf.py's SIZES), made once on
the GPU and saved (bf16 safetensors) under --models. Every run has a timeout; a failure (OOM,
crash, timeout) is recorded with its last lines and the rest goes on.

Writes, under --results (default benchmarks/results):
    <date>-<device>.jsonl       one line per workload (a later call replaces its workloads' lines)
    <date>-<device>-runs.jsonl  one line per run: every zerotune variant, every peer setting
benchmarks/README.md explains every field.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER = "benchmarks/peer_hf.py"
TOKENIZER = "examples/tokenizers/phi-3-mini"
ALPACA = "examples/data/alpaca/alpaca_en_demo.json"
SHAREGPT = "examples/data/sharegpt/dummy_conversation.json"
PACKAGE_DIRS = ("core", "launcher", "training", "ds_configs", "slurm")  # pyproject's package-dir map
GIB = 2 ** 30

SIZES = {  # benchmarks/peer_hf.py's Llama-3 shapes (tests/test_bench.py checks they match)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # CPU smoke test only: the peer's tiny shape with the phi-3 tokenizer's vocabulary (so no resize)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32064, tie_word_embeddings=True),
}

# gpus: a number, or "all" (every GPU of the machine, at least min_gpus). data: None = random
# words (text rows that each fill max_len: the zerotune twin of the peer's random tokens).
WORKLOADS = {
    "full-1b": dict(size="1b", method="full", mbs=8, gpus=1, zero=3),
    "full-1b-offload": dict(size="1b", method="full", mbs=8, gpus=1, zero=3, offload=True),
    "full-8b": dict(size="8b", method="full", mbs=4, gpus="all", min_gpus=4, zero=3),
    "lora-8b": dict(size="8b", method="lora", mbs=4, gpus=1, zero=0),
    "qlora-8b": dict(size="8b", method="qlora", mbs=4, gpus=1, zero=0),
    "chat-alpaca": dict(size="1b", method="full", mbs=8, gpus=1, zero=3, data=(ALPACA, "alpaca")),
    "chat-sharegpt": dict(size="1b", method="full", mbs=8, gpus=1, zero=3, data=(SHAREGPT, "sharegpt")),
    # a CPU smoke test of this script (tests/test_bench.py); no peer (it needs CUDA); not in the default set
    "tiny": dict(size="tiny", method="full", mbs=2, gpus=1, zero=3, seq=128, dtype="fp32", peer=False, hidden=True),
}
SEQ = 2048

# zerotune variants: name -> `--set` overrides on top of the workload's recipe. "default" is the
# recipe as a user writes it; "unfused-loss" is the before-baseline (plain cross entropy over full
# logits); the others are candidate optimisations. The workload's figure is its fastest variant.
UNFUSED = ["train.fused_loss=false"]
NO_GC = ["train.gradient_checkpointing=false"]
VARIANTS = {
    "full-1b": {"default": [], "unfused-loss": UNFUSED, "no-gc": NO_GC,
                "zero2": ["distributed.zero=2"], "zero2-no-gc": ["distributed.zero=2", *NO_GC]},
    "full-1b-offload": {"default": [], "unfused-loss": UNFUSED, "no-gc": NO_GC},
    "full-8b": {"default": [], "unfused-loss": UNFUSED, "no-gc": NO_GC},
    "lora-8b": {"default": [], "unfused-loss": UNFUSED, "no-gc": NO_GC},
    "qlora-8b": {"default": [], "unfused-loss": UNFUSED, "no-gc": NO_GC},
    "chat-alpaca": {"default": [], "unfused-loss": UNFUSED, "no-gc": NO_GC,
                    "flex": ["model.attn_implementation=flex_attention"]},
    "chat-sharegpt": {"default": [], "unfused-loss": UNFUSED, "no-gc": NO_GC,
                      "flex": ["model.attn_implementation=flex_attention"]},
    "tiny": {"default": [], "no-gc": NO_GC},
}
# peer settings: name -> extra peer_hf.py arguments. "Best peer" = the fastest that ran.
PEER_SETTINGS = {"default": [], "no-gc": ["--no-gc"], "liger": ["--liger"], "liger-no-gc": ["--liger", "--no-gc"]}

RESULT_KEYS = ("workload", "device", "gpus", "zerotune_tok_s_gpu", "zerotune_mfu", "zerotune_peak_gib",
               "peer_default_tok_s_gpu", "peer_best_tok_s_gpu", "peer_best_setting", "peer_best_peak_gib",
               "ratio_default", "ratio_best")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the machine
def detect_gpus() -> tuple[str, int]:
    """(GPU name, count) from nvidia-smi, without importing torch here (a CUDA context in this
    process would take GPU memory from every run); ("cpu", 0) without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "cpu", 0
    names = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return (names[0], len(names)) if names else ("cpu", 0)


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (the results file name)."""
    s = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


# ----------------------------------------------------------------------------- making zerotune importable
def make_package(folder: Path) -> Path:
    """folder/zerotune/{core,launcher,training,ds_configs,slurm} -> symlinks into this checkout
    (pyproject's package-dir map; `zerotune` is a namespace package). Returns the folder for PYTHONPATH."""
    pkg = folder / "zerotune"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in PACKAGE_DIRS:
        link = pkg / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == REPO / name:
                continue
            link.unlink()
        link.symlink_to(REPO / name, target_is_directory=True)
    return folder


def child_env(pkg_dir: Path | None, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if pkg_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pkg_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------- models and data
def model_dir(models: Path, size: str) -> Path:
    return models / f"llama3-{size}-random"


def make_model(size: str, path: Path) -> None:
    """A random-initialised model folder (config + bf16 safetensors), as peer_hf.py builds it;
    `.done` last (peer_hf.py --model-dir waits for it)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, rope_theta=500000.0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    (path / ".done").touch()


def random_words_file(folder: Path, rows: int, seq: int) -> Path:
    """Rows of random lowercase words, each longer than `seq` tokens (every word is at least one
    token), format text: with packing each row becomes exactly one sequence of `seq` tokens."""
    import random
    path = folder / f"random-words-{seq}x{rows}.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(rows):
            words = ("".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(seq + 64))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- commands
class Plan:
    """Everything one bench call runs, derived from the command line (dry-run prints it)."""

    def __init__(self, a, machine_gpus: int):
        self.a, self.machine_gpus = a, machine_gpus
        self.work = Path(a.work_dir).resolve()
        self.models = Path(a.models).resolve() if a.models else self.work / "models"
        self.pkg = self.work / "pkg"

    def seq(self, wl: str) -> int:
        return WORKLOADS[wl].get("seq", SEQ)

    def gpus(self, wl: str) -> tuple[int, str | None]:
        """GPUs of the workload, and why it is skipped (None: it runs)."""
        w = WORKLOADS[wl]
        if w["gpus"] != "all":
            return w["gpus"], None
        n = self.a.gpus or self.machine_gpus
        if n < w.get("min_gpus", 1) and not self.a.gpus:
            return n, f"needs {w['min_gpus']} GPUs, the machine has {n} (--gpus N to try anyway)"
        return n, None

    def rows(self, wl: str) -> int:
        w = WORKLOADS[wl]
        return w["mbs"] * max(1, self.gpus(wl)[0]) * (self.a.steps + 2) + 8

    def data_file(self, wl: str) -> Path:
        w = WORKLOADS[wl]
        if w.get("data"):
            return REPO / w["data"][0]
        return self.work / "data" / f"random-words-{self.seq(wl)}x{self.rows(wl)}.jsonl"

    def recipe(self, wl: str) -> dict:
        w = WORKLOADS[wl]
        method = {"kind": w["method"]}
        if w["method"] in ("lora", "qlora"):  # the peer's LoraConfig
            method["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
        fmt = w["data"][1] if w.get("data") else "text"
        return {
            "name": wl, "output_dir": str(self.work / "runs"),
            "model": {"path": str(model_dir(self.models, w["size"])), "tokenizer": str(REPO / TOKENIZER),
                      "dtype": w.get("dtype", "bf16"), "attn_implementation": "sdpa", "chat_template": None},
            "method": method,
            "data": {"train": [{"path": str(self.data_file(wl)), "format": fmt}], "max_len": self.seq(wl),
                     "packing": True, "eval_split": 0.0},
            "train": {"max_steps": self.a.steps, "micro_batch_size": w["mbs"], "grad_accum": 1, "lr": 1e-5,
                      "warmup_steps": 0, "gradient_checkpointing": True},
            "distributed": {"zero": w["zero"], "offload_optimizer": bool(w.get("offload")),
                            "offload_params": bool(w.get("offload"))},
            "checkpoint": {"save_final": False, "keep": 1},
            "logging": {"progress": False, "every": 1},
        }

    def recipe_path(self, wl: str) -> Path:
        return self.work / "recipes" / f"{wl}.yaml"

    def run_name(self, wl: str, variant: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{wl}--{variant}")

    def zerotune_cmd(self, wl: str, variant: str, sets: list[str]) -> list[str]:
        g = self.gpus(wl)[0]
        cmd = [sys.executable, "-m", "zerotune.launcher.cli", "train", str(self.recipe_path(wl)), "--nproc", str(g),
               "--set", f"name={self.run_name(wl, variant)}"]
        for s in sets:
            cmd += ["--set", s]
        return cmd

    def peer_cmd(self, wl: str, extra: list[str]) -> list[str]:
        w = WORKLOADS[wl]
        g = self.gpus(wl)[0]
        mode = "full" if w["method"] == "full" else w["method"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(g), PEER, mode,
               "--size", w["size"], "--seq", str(self.seq(wl)), "--mbs", str(w["mbs"]),
               "--steps", str(self.a.steps), "--warmup", str(self.a.warmup)]
        if w.get("offload"):
            cmd.append("--offload")
        if w["method"] != "full":
            cmd += ["--model-dir", str(model_dir(self.models, w["size"]))]
        if w.get("data"):
            cmd += ["--data", w["data"][0], "--format", w["data"][1], "--tokenizer", TOKENIZER,
                    "--max-len", str(self.seq(wl))]
        return cmd + list(extra)

    def variants(self, wl: str) -> dict[str, list[str]]:
        table = VARIANTS.get(wl, {"default": []})
        keep = self.a.variants
        out = {k: v for k, v in table.items() if keep is None or k in keep}
        out.update(self.a.variant)  # --variant NAME=SETS: always run
        return out

    def peer_settings(self, wl: str) -> dict[str, list[str]]:
        if WORKLOADS[wl].get("peer", True) is False:
            return {}
        keep = self.a.peer_settings
        out = {k: v for k, v in PEER_SETTINGS.items() if keep is None or k in keep}
        out.update(self.a.peer_setting)
        return out


# ----------------------------------------------------------------------------- running one command
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun starts its workers in new sessions,
    so a process group does not reach them). Everything is stopped first so that no parent can
    react (torchrun would SIGTERM the workers, which zerotune answers with a checkpoint)."""
    kids, tree, todo = _children(), [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo += kids.get(p, [])
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass


def run_command(cmd: list[str], log: Path, env: dict, timeout: float, done=None) -> dict:
    """Run `cmd` (output to `log`) until it exits, `timeout` passes, or done() says the
    measurement is complete (then the rest, e.g. zerotune's final checkpoint save, is killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        state = "exited"
        while True:
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.time() - t0 > timeout:
                state = "timeout"
            elif done is not None and done():
                time.sleep(0.5)
                state = "stopped-after-last-step"
            else:
                continue
            kill_tree(proc.pid)
            proc.wait()
            break
    return {"rc": proc.returncode, "state": state, "wall_s": round(time.time() - t0, 1)}


NOISE = re.compile(r"warn|deprecat|futurewarning|^\s*$|^\[rank\d+\]:\s*$", re.I)


def error_tail(log: Path, n: int = 12, limit: int = 2500) -> str:
    """The last lines of a failed run that say something (warnings dropped), the traceback's
    last line first when there is one."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if not NOISE.search(ln)]
    tail = "\n".join(keep[-n:])
    return tail[-limit:]


def is_oom(text: str) -> bool:
    return bool(re.search(r"out of memory|OutOfMemoryError|CUDA error: out of memory", text, re.I))


# ----------------------------------------------------------------------------- reading results
def train_records(metrics_file: Path) -> tuple[list[dict], int]:
    """Train records (the last of each step) and the world size from RUN_DIR/metrics.jsonl."""
    by_step, world = {}, 1
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if rec.get("event") == "start":
            world = int(rec.get("world_size") or world)
        elif "train/tokens_per_sec" in rec and "step" in rec:
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)], world


def parse_metrics(metrics_file: Path, warmup: int) -> dict:
    """Median tokens/s per GPU and MFU over the steps after `warmup`, peak GPU memory (GiB) of
    rank 0 over the whole run. train/tokens_per_sec is global (real tokens of all ranks); the
    memory keys are in GB (1e9 bytes)."""
    recs, world = train_records(metrics_file)
    timed = [r for r in recs if r["step"] > warmup]
    if not timed:
        raise ValueError(f"{metrics_file}: no train steps after the {warmup} warm-up steps "
                         f"({len(recs)} train records)")
    tps = [r["train/tokens_per_sec"] / world for r in timed]
    mfus = [r["train/mfu"] for r in timed if r.get("train/mfu") is not None]
    peaks = [r["train/gpu_mem_peak_gb"] for r in recs if r.get("train/gpu_mem_peak_gb") is not None]
    secs = [r.get("time/step_s") for r in timed]
    mean = (sum(t * s for t, s in zip(tps, secs)) / sum(secs)) if all(secs) else None
    eff = [r["data/packing_efficiency"] for r in timed if r.get("data/packing_efficiency") is not None]
    return {"tok_s_gpu": round(statistics.median(tps)), "tok_s_gpu_mean": round(mean) if mean else None,
            "mfu": round(statistics.median(mfus), 4) if mfus else None,
            "peak_gib": round(max(peaks) * 1e9 / GIB, 2) if peaks else None,
            "step_s": round(statistics.median(secs), 4) if all(secs) else None,
            "packing_efficiency": round(statistics.median(eff), 4) if eff else None,
            "world": world, "timed_steps": len(timed), "last_step": recs[-1]["step"] if recs else 0}


def parse_peer(log: Path) -> dict | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        i = line.find("RESULT {")
        if i >= 0:
            return json.loads(line[i + 7:])
    return None


def last_step(metrics_file: Path) -> int:
    try:
        recs, _ = train_records(metrics_file)
    except OSError:
        return 0
    return recs[-1]["step"] if recs else 0


# ----------------------------------------------------------------------------- one workload
def best_of(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if r.get("ok")]
    return max(ok, key=lambda r: r["tok_s_gpu"]) if ok else None


def summarize(wl: str, device: str, gpus: int, zt: list[dict], peer: list[dict], meta: dict) -> dict:
    best = best_of(zt)
    pbest = best_of(peer)
    pdef = next((r for r in peer if r["name"] == "default" and r.get("ok")), None)
    zdef = next((r for r in zt if r["name"] == "default" and r.get("ok")), None)
    ratio = lambda a, b: round(a["tok_s_gpu"] / b["tok_s_gpu"], 3) if a and b else None  # noqa: E731
    brief = lambda r: ({k: r.get(k) for k in ("tok_s_gpu", "mfu", "peak_gib")} if r.get("ok")  # noqa: E731
                       else {"error": r.get("error_kind"), "tail": (r.get("error") or "")[-300:]})
    return {
        "workload": wl, "device": device, "gpus": gpus,
        "zerotune_tok_s_gpu": best and best["tok_s_gpu"], "zerotune_mfu": best and best["mfu"],
        "zerotune_peak_gib": best and best["peak_gib"],
        "peer_default_tok_s_gpu": pdef and pdef["tok_s_gpu"],
        "peer_best_tok_s_gpu": pbest and pbest["tok_s_gpu"], "peer_best_setting": pbest and pbest["name"],
        "peer_best_peak_gib": pbest and pbest["peak_gib"],
        "ratio_default": ratio(best, pdef), "ratio_best": ratio(best, pbest),
        # extras
        "zerotune_variant": best and best["name"], "zerotune_default_tok_s_gpu": zdef and zdef["tok_s_gpu"],
        "zerotune_default_peak_gib": zdef and zdef["peak_gib"],
        "peer_default_mfu": pdef and pdef["mfu"], "peer_default_peak_gib": pdef and pdef["peak_gib"],
        "peer_best_mfu": pbest and pbest["mfu"],
        "zerotune_variants": {r["name"]: brief(r) for r in zt},
        "peer_settings": {r["name"]: brief(r) for r in peer},
        **meta,
    }


def merge_results(path: Path, lines: list[dict]) -> None:
    """Write `lines` into `path`, replacing earlier lines of the same workloads."""
    old = []
    if path.is_file():
        old = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    new = {d["workload"]: d for d in lines}
    out = [new.pop(d["workload"]) if d["workload"] in new else d for d in old] + list(new.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(d) + "\n" for d in out))
    tmp.replace(path)


class Bench:
    def __init__(self, a, plan: Plan, device: str):
        self.a, self.plan, self.device = a, plan, device
        self.t0 = time.time()
        results = Path(a.results)
        stem = f"{time.strftime('%Y-%m-%d')}-{device_slug(device)}"
        self.results_file = results / f"{stem}.jsonl"
        self.runs_file = results / f"{stem}-runs.jsonl"
        self.env = None

    def over_budget(self) -> bool:
        return self.a.budget_s is not None and time.time() - self.t0 > self.a.budget_s

    def record_run(self, rec: dict) -> None:
        self.runs_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.runs_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def prepare(self, workloads: list[str]) -> None:
        p = self.plan
        make_package(p.pkg)
        self.env = child_env(p.pkg)
        for size in dict.fromkeys(WORKLOADS[w]["size"] for w in workloads):
            path = model_dir(p.models, size)
            if (path / ".done").is_file():
                continue
            say(f"model {size}: making a random-initialised Llama-3 {size} in {path}")
            t = time.time()
            proc = subprocess.run([sys.executable, __file__, "_make-model", size, str(path)], env=self.env, cwd=REPO,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"making the {size} model failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
            say(f"model {size}: saved in {time.time() - t:.0f}s")
        for wl in workloads:
            if not WORKLOADS[wl].get("data"):
                random_words_file(p.work / "data", p.rows(wl), p.seq(wl))
            path = p.recipe_path(wl)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(p.recipe(wl), indent=1) + "\n")  # JSON is YAML

    def zerotune_run(self, wl: str, name: str, sets: list[str]) -> dict:
        p, a = self.plan, self.a
        run_dir = p.work / "runs" / p.run_name(wl, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        metrics = run_dir / "metrics.jsonl"
        log = p.work / "logs" / f"{p.run_name(wl, name)}.zerotune.log"
        cmd = p.zerotune_cmd(wl, name, sets)
        done = None if a.let_finish else (lambda: last_step(metrics) >= a.steps)
        say(f"{wl} zerotune {name}: {' '.join(sets) or '(recipe as is)'}")
        r = run_command(cmd, log, self.env, a.timeout, done)
        rec = {"workload": wl, "side": "zerotune", "name": name, "sets": sets, "cmd": shlex.join(cmd),
               "run_dir": str(run_dir), "log": str(log), **r}
        try:
            rec.update(parse_metrics(metrics, a.warmup))
            rec["ok"] = (r["rc"] == 0 or r["state"] == "stopped-after-last-step") and rec["last_step"] >= a.steps
        except (OSError, ValueError) as e:
            rec["ok"], rec["parse_error"] = False, str(e)
        if not rec["ok"]:
            failed = run_dir / "FAILED"
            tail = error_tail(log)
            rec["error"] = (failed.read_text()[-1500:] + "\n" if failed.is_file() else "") + tail
            rec["error_kind"] = ("timeout" if r["state"] == "timeout" else "OOM" if is_oom(rec["error"])
                                 else f"exit {r['rc']}")
        return rec

    def peer_run(self, wl: str, name: str, extra: list[str]) -> dict:
        p, a = self.plan, self.a
        log = p.work / "logs" / f"{p.run_name(wl, name)}.peer.log"
        cmd = p.peer_cmd(wl, extra)
        say(f"{wl} peer {name}: {' '.join(extra) or '(defaults)'}")
        r = run_command(cmd, log, self.env, a.timeout)
        rec = {"workload": wl, "side": "peer", "name": name, "args": extra, "cmd": shlex.join(cmd), "log": str(log), **r}
        res = parse_peer(log)
        rec["ok"] = r["rc"] == 0 and res is not None
        if res is not None:
            rec["result"] = res
            rec["tok_s_gpu"] = res.get("real_tok_s_gpu", res["tok_s_gpu"])
            rec["mfu"], rec["peak_gib"] = res.get("mfu"), res.get("peak_gib")
        if not rec["ok"]:
            rec["error"] = error_tail(log)
            rec["error_kind"] = "timeout" if r["state"] == "timeout" else "OOM" if is_oom(rec["error"]) else f"exit {r['rc']}"
        return rec

    def report(self, rec: dict) -> None:
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        rec["device"] = self.device
        self.record_run(rec)
        who = f"{rec['workload']} {rec['side']} {rec['name']}"
        if rec.get("ok"):
            mfu = f", MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
            peak = f", peak {rec['peak_gib']:.1f} GiB" if rec.get("peak_gib") is not None else ""
            say(f"{who}: {rec['tok_s_gpu']:,} tok/s/GPU{mfu}{peak} ({rec['wall_s']:.0f}s)")
        else:
            last = (rec.get("error") or rec.get("parse_error") or "").strip().splitlines()
            say(f"{who}: FAILED ({rec.get('error_kind')}, {rec['wall_s']:.0f}s): {last[-1] if last else ''}")

    def workload(self, wl: str) -> dict | None:
        p = self.plan
        gpus, skip = p.gpus(wl)
        if skip:
            say(f"{wl}: skipped: {skip}")
            return None
        zt, peer = [], []
        for name, sets in p.variants(wl).items():
            if self.over_budget():
                say(f"{wl} zerotune {name}: skipped (--budget-s spent)")
                continue
            rec = self.zerotune_run(wl, name, sets)
            self.report(rec)
            zt.append(rec)
        for name, extra in p.peer_settings(wl).items():
            if self.over_budget():
                say(f"{wl} peer {name}: skipped (--budget-s spent)")
                continue
            rec = self.peer_run(wl, name, extra)
            self.report(rec)
            peer.append(rec)
        w = WORKLOADS[wl]
        meta = {"date": time.strftime("%Y-%m-%d"), "size": w["size"], "method": w["method"], "mbs": w["mbs"],
                "seq": p.seq(wl), "steps": self.a.steps, "warmup": self.a.warmup,
                "data": w["data"][1] if w.get("data") else "random"}
        line = summarize(wl, self.device, gpus, zt, peer, meta)
        merge_results(self.results_file, [line])
        say(f"{wl}: zerotune {fmt_num(line['zerotune_tok_s_gpu'])} ({line['zerotune_variant']}), "
            f"peer default {fmt_num(line['peer_default_tok_s_gpu'])}, best {fmt_num(line['peer_best_tok_s_gpu'])} "
            f"({line['peer_best_setting']}); ratio {line['ratio_default']} / {line['ratio_best']}")
        return line


# ----------------------------------------------------------------------------- the table
def fmt_num(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


def fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_gib(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_table(lines: list[dict]) -> str:
    """The README table (markdown) from a results .jsonl."""
    head = ["workload", "GPUs", "zerotune tok/s/GPU (variant)", "MFU", "peak GiB", "peer default tok/s/GPU",
            "peer best tok/s/GPU (setting)", "peer best peak GiB", "vs default", "vs best"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    devices = sorted({d.get("device", "?") for d in lines})
    for d in lines:
        zt = fmt_num(d.get("zerotune_tok_s_gpu"))
        if d.get("zerotune_tok_s_gpu") is None:
            errs = {v.get("error") for v in (d.get("zerotune_variants") or {}).values()} - {None}
            zt = "failed" + (f" ({', '.join(sorted(errs))})" if errs else "")
        elif d.get("zerotune_variant"):
            zt += f" ({d['zerotune_variant']})"
        pb = fmt_num(d.get("peer_best_tok_s_gpu"))
        if d.get("peer_best_setting"):
            pb += f" ({d['peer_best_setting']})"
        out.append("| " + " | ".join([d["workload"], str(d.get("gpus", "-")), zt, fmt_pct(d.get("zerotune_mfu")),
                                      fmt_gib(d.get("zerotune_peak_gib")), fmt_num(d.get("peer_default_tok_s_gpu")),
                                      pb, fmt_gib(d.get("peer_best_peak_gib")), fmt_ratio(d.get("ratio_default")),
                                      fmt_ratio(d.get("ratio_best"))]) + " |")
    out.append("")
    out.append(f"Device: {', '.join(devices)}. tok/s/GPU: median over the steps after the warm-up, real "
               "(non-padding) tokens; ratio = zerotune's best variant over the peer's default / best setting.")
    return "\n".join(out)


def table_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.py table", description="print the README table from a results .jsonl")
    p.add_argument("file", type=Path)
    a = p.parse_args(argv)
    lines = [json.loads(ln) for ln in a.file.read_text().splitlines() if ln.strip()]
    print(render_table(lines))
    return 0


# ----------------------------------------------------------------------------- the command line
def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _named(value: str) -> tuple[str, list[str]]:
    name, sep, rest = value.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=ARGS")
    return name.strip(), shlex.split(rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="`bench.py table FILE.jsonl` prints the README table. benchmarks/README.md has more.")
    p.add_argument("--only", type=_names, default=None, metavar="W1,W2",
                   help=f"workloads (default: all but tiny): {', '.join(WORKLOADS)}")
    p.add_argument("--variants", type=_names, default=None, metavar="V1,V2",
                   help="zerotune variants to run from the table (default: all of each workload's)")
    p.add_argument("--variant", type=_named, action="append", default=[], metavar="NAME='KEY=VALUE ...'",
                   help="an extra zerotune variant for every selected workload: --set overrides, space-separated")
    p.add_argument("--peer-settings", type=_names, default=None, metavar="S1,S2",
                   help=f"peer settings to run (default: all: {', '.join(PEER_SETTINGS)}; 'none': no peer)")
    p.add_argument("--peer-setting", type=_named, action="append", default=[], metavar="NAME='ARGS'",
                   help="an extra peer setting: peer_hf.py arguments, e.g. 'mbs16=--mbs 16'")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the medians (default 4)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed (default 600)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new runs after this many seconds (the rest are recorded as skipped)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the workloads that use all of them (full-8b)")
    p.add_argument("--machine-gpus", type=int, default=None, help=argparse.SUPPRESS)  # tests: pretend
    p.add_argument("--work-dir", default="/tmp/zerotune-bench", help="models, data, recipes, runs, logs")
    p.add_argument("--models", default=None, help="where the random models are saved (default WORK_DIR/models)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the .jsonl files go")
    p.add_argument("--let-finish", action="store_true",
                   help="let each zerotune run end on its own (final checkpoint save) instead of stopping it "
                        "once the last step is logged")
    p.add_argument("--dry-run", action="store_true", help="print every command it would run, run nothing")
    return p


def select(a) -> list[str]:
    names = a.only or [w for w, v in WORKLOADS.items() if not v.get("hidden")]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"bench.py: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if a.peer_settings == ["none"]:
        a.peer_settings = []
    for flag, given, known in (("--variants", a.variants, {v for t in VARIANTS.values() for v in t}),
                               ("--peer-settings", a.peer_settings, set(PEER_SETTINGS))):
        bad = sorted(set(given or []) - known)
        if bad:
            raise SystemExit(f"bench.py: {flag}: unknown {', '.join(bad)}; known: {', '.join(sorted(known))}")
    return names


def dry_run(a, plan: Plan, names: list[str], device: str) -> None:
    env = f"PYTHONPATH={plan.pkg}{os.pathsep}$PYTHONPATH"
    print(f"# device {device}, {plan.machine_gpus} GPU(s); every command runs in {REPO} with {env}")
    print(f"# zerotune is importable from {plan.pkg}/zerotune -> symlinks to {', '.join(PACKAGE_DIRS)}")
    for size in dict.fromkeys(WORKLOADS[w]["size"] for w in names):
        print(f"$ {shlex.join([sys.executable, __file__, '_make-model', size, str(model_dir(plan.models, size))])}"
              "   # unless it exists")
    for wl in names:
        gpus, skip = plan.gpus(wl)
        if skip:
            print(f"# {wl}: skipped: {skip}")
            continue
        print(f"# {wl}: {gpus} GPU(s); recipe {plan.recipe_path(wl)} = {json.dumps(plan.recipe(wl))}")
        for name, sets in plan.variants(wl).items():
            print(f"$ {shlex.join(plan.zerotune_cmd(wl, name, sets))}   # zerotune {name}")
        for name, extra in plan.peer_settings(wl).items():
            print(f"$ {shlex.join(plan.peer_cmd(wl, extra))}   # peer {name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        return table_main(argv[1:])
    if argv[:1] == ["_make-model"]:  # child: make one model
        make_model(argv[1], Path(argv[2]))
        return 0
    a = parser().parse_args(argv)
    a.variant, a.peer_setting = dict(a.variant), dict(a.peer_setting)
    if a.warmup >= a.steps:
        raise SystemExit("bench.py: --warmup must be below --steps")
    names = select(a)
    device, machine_gpus = detect_gpus()
    if a.machine_gpus is not None:
        machine_gpus = a.machine_gpus
    plan = Plan(a, machine_gpus if machine_gpus else 1)
    if a.dry_run:
        dry_run(a, plan, names, device)
        return 0
    if device == "cpu" and any(not WORKLOADS[w].get("dtype") == "fp32" for w in names):
        say("no GPU found (nvidia-smi): bf16 workloads will be slow or fail; only `tiny` is meant for CPU")
    bench = Bench(a, plan, device)
    say(f"bench: {', '.join(names)} on {device} x{machine_gpus}; results -> {bench.results_file}")
    runnable = [w for w in names if not plan.gpus(w)[1]]
    bench.prepare(runnable)
    lines = [bench.workload(wl) for wl in names]
    lines = [ln for ln in lines if ln]
    print()
    print(render_table(lines))
    say(f"bench: done in {time.time() - bench.t0:.0f}s; {bench.results_file}, {bench.runs_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
