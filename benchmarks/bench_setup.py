"""benchmarks/bench.py's setup: what every bench call runs, before anything runs.

The constants (paths, peer_hf.py's model SIZES, the WORKLOADS, zerotune VARIANTS, PEER_SETTINGS (HF
Trainer, peer_hf.py) and TRL_SETTINGS (TRL's SFTTrainer, peer_trl.py: every name starts with trl-)),
the package shim that makes `zerotune` importable from this checkout without installing it, the
random-initialised models and random-words data, and the Plan: each workload's recipe, zerotune
and peer commands, variants and peer settings, derived from the command line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER = "benchmarks/peer_hf.py"
TRL_PEER = "benchmarks/peer_trl.py"
TOKENIZER = "examples/tokenizers/phi-3-mini"
ALPACA = "examples/data/alpaca/alpaca_en_demo.json"
SHAREGPT = "examples/data/sharegpt/dummy_conversation.json"
PACKAGE_DIRS = ("core", "launcher", "training", "ds_configs", "slurm")  # pyproject's package-dir map

SIZES = {  # Llama-3 family shapes: the one table of zerotune's benchmarks and the peer (peer_hf.py imports it)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # CPU smoke tests: tiny, with the phi-3 tokenizer's vocabulary (so no resize)
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
    # issue 26: LoRA 8B on the Alpaca demo (1,000 rows, repeated 4x so no run runs out), chat template, loss on
    # the responses, data.packing: true as a user turns it on; beside HF Trainer and TRL's SFTTrainer (trl-*)
    "chat-lora-8b": dict(size="8b", method="lora", mbs=4, gpus=1, zero=0, data=(ALPACA, "alpaca"), repeat=4,
                         peers=("hf", "trl"), peer_settings={"liger-no-gc-mbs16": ["--liger", "--no-gc", "--mbs", "16"]}),
    # long context (issue 15), run with --only: full 8B, sequences split over sp GPUs of the machine
    # (distributed.sequence_parallel); the peer trains the same length without sequence parallelism
    "long-8b-32k": dict(size="8b", method="full", mbs=1, gpus="all", min_gpus=4, zero=3, seq=32768, sp=4, hidden=True),
    "long-8b-128k": dict(size="8b", method="full", mbs=1, gpus="all", min_gpus=4, zero=3, seq=131072, sp=4,
                         hidden=True),
    # one GPU, LoRA 8B at 32k tokens (issue 20): no sequence parallelism, the recipe's autos decide
    "lora-8b-32k": dict(size="8b", method="lora", mbs=1, gpus=1, zero=0, seq=32768, hidden=True),
    "lora-8b-128k": dict(size="8b", method="lora", mbs=1, gpus=1, zero=0, seq=131072, hidden=True),
    # issue 28: one GPU at 128k (QLoRA) and 512k, as recipes/llama3-8b-lora-512k.yaml writes it (one
    # document a row, LoRA without dropout); no peer (HF Trainer runs out of memory from 128k)
    "qlora-8b-128k": dict(size="8b", method="qlora", mbs=1, gpus=1, zero=0, seq=131072, peer=False, hidden=True),
    "lora-8b-512k": dict(size="8b", method="lora", mbs=1, gpus=1, zero=0, seq=524288, packing=False, lora_dropout=0.0,
                         peer=False, hidden=True),
    "qlora-8b-512k": dict(size="8b", method="qlora", mbs=1, gpus=1, zero=0, seq=524288, packing=False,
                          lora_dropout=0.0, peer=False, hidden=True),
    "long-lora-8b-32k": dict(size="8b", method="lora", mbs=1, gpus="all", min_gpus=4, zero=3, seq=32768, sp=4,
                             hidden=True),
    # issue 29 part C: LoRA 8B data-parallel over every GPU of the machine (the peer: torchrun, DDP), and
    # at 131,072 tokens with sequence parallelism over 4
    "lora-8b-dp": dict(size="8b", method="lora", mbs=4, gpus="all", min_gpus=2, zero=0, hidden=True),
    "long-lora-8b-128k": dict(size="8b", method="lora", mbs=1, gpus="all", min_gpus=4, zero=3, seq=131072, sp=4,
                              peer=False, hidden=True),
    # a CPU smoke test of bench.py (tests/test_bench.py); no peer (it needs CUDA); not in the default set
    "tiny": dict(size="tiny", method="full", mbs=2, gpus=1, zero=3, seq=128, dtype="fp32", peer=False, hidden=True),
}
SEQ = 2048

# zerotune variants: name -> `--set` overrides on top of the workload's recipe. "default" is the
# recipe as a user writes it; "unfused-loss" is the before-baseline (plain cross entropy over full
# logits); the others are candidate optimisations. The workload's figure is its fastest variant.
UNFUSED = ["train.fused_loss=false"]
KEEP_ATTENTION = ["train.recompute_attention=false"]
RECOMPUTE_ATTENTION = ["train.recompute_attention=true"]
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
    # unpacked-mbs16: packing off at micro-batch 16 (the 0.81x); the plan reads the real lengths
    "chat-lora-8b": {"default": [], "no-gc": NO_GC,
                     "unpacked-mbs16": ["data.packing=false", "train.micro_batch_size=16"]},
    "long-8b-32k": {"default": [], "sp2": ["distributed.sequence_parallel=2"]},
    "long-8b-128k": {"default": [], "offload-activations": ["train.offload_activations=true"]},
    "long-lora-8b-32k": {"default": []},
    "lora-8b-dp": {"default": []},
    "long-lora-8b-128k": {"default": []},
    # keep-attn: checkpointed layers keep attention's output instead of recomputing it (1.07x at 32k, one H100,
    # 2026-12-06 call C); train.recompute_attention: auto now keeps it where the planner finds it pays, so
    # recompute-attn is the before-baseline of the recipe as written
    "lora-8b-32k": {"default": [], "kernels-none": ["model.kernels=none"], "keep-attn": KEEP_ATTENTION,
                    "recompute-attn": RECOMPUTE_ATTENTION},
    "lora-8b-128k": {"default": [], "keep-attn": KEEP_ATTENTION, "recompute-attn": RECOMPUTE_ATTENTION},
    "qlora-8b-128k": {"default": []},
    "lora-8b-512k": {"default": []},
    "qlora-8b-512k": {"default": []},
}
for _wl in ("full-1b", "lora-8b", "qlora-8b"):   # issue 20: liger's share of the recipe as written
    VARIANTS[_wl]["kernels-none"] = ["model.kernels=none"]
# peer settings: name -> extra peer_hf.py arguments. "Best peer" = the fastest that ran (HF Trainer's and
# TRL's alike).
PEER_SETTINGS = {"default": [], "no-gc": ["--no-gc"], "liger": ["--liger"], "liger-no-gc": ["--liger", "--no-gc"],
                 # one GPU without DeepSpeed (full mode; the adapter modes never use DeepSpeed)
                 "plain-no-gc": ["--plain", "--no-gc"], "plain-liger-no-gc": ["--plain", "--liger", "--no-gc"]}
# TRL's SFTTrainer (peer_trl.py), for the workloads whose peers include "trl": packing = best-fit-decreasing rows
# of max_len tokens, padding-free; padding-free alone flattens each batch of samples; Liger is CUDA-only
# (trl-packing runs on CPU: the smoke test). Micro-batch: the workload's rows when packed, 16 samples padding-free.
TRL_SETTINGS = {"trl-packing": ["--packing"], "trl-packing-liger": ["--packing", "--liger"],
                "trl-packing-liger-no-gc": ["--packing", "--liger", "--no-gc"],
                "trl-padding-free-liger-no-gc": ["--padding-free", "--liger", "--no-gc", "--mbs", "16"]}


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


def random_llama(folder: Path, hidden: int, layers: int, intermediate: int, **config) -> int:
    """A random fp32 Llama (seed 0, heads of 64) with examples/stories260K's tokenizer and its
    512-token vocabulary, for CPU measurements through `zerotune train`; returns its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, **config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    for f in (REPO / "examples" / "stories260K").iterdir():
        if "token" in f.name:
            shutil.copy(f, folder / f.name)
    return sum(p.numel() for p in model.parameters())


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


def repeated_file(src: Path, folder: Path, times: int) -> Path:
    """A .json list of `src`'s rows `times` over (a chat set too small for every run's steps)."""
    path = folder / f"{src.stem}-x{times}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rows = json.loads(src.read_text())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows * times))
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
        return self.a.seq or WORKLOADS[wl].get("seq", SEQ)

    def size(self, wl: str) -> str:
        """The model size: the workload's, or --size for every workload (tiny: the CPU smoke shape)."""
        return self.a.size or WORKLOADS[wl]["size"]

    def dtype(self, wl: str) -> str:
        return "fp32" if self.size(wl) == "tiny" else WORKLOADS[wl].get("dtype", "bf16")

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
        if w.get("repeat"):
            return self.work / "data" / f"{Path(w['data'][0]).stem}-x{w['repeat']}.json"   # Bench.prepare writes it
        if w.get("data"):
            return REPO / w["data"][0]
        return self.work / "data" / f"random-words-{self.seq(wl)}x{self.rows(wl)}.jsonl"

    def recipe(self, wl: str) -> dict:
        w = WORKLOADS[wl]
        method = {"kind": w["method"]}
        if w["method"] in ("lora", "qlora"):  # the peer's LoraConfig
            method["lora"] = {"r": 16, "alpha": 32, "dropout": w.get("lora_dropout", 0.05), "target_modules": "all-linear"}
        fmt = w["data"][1] if w.get("data") else "text"
        return {
            "name": wl, "output_dir": str(self.work / "runs"),
            "model": {"path": str(model_dir(self.models, self.size(wl))), "tokenizer": str(REPO / TOKENIZER),
                      "dtype": self.dtype(wl), "attn_implementation": "sdpa", "chat_template": None},
            "method": method,
            "data": {"train": [{"path": str(self.data_file(wl)), "format": fmt}], "max_len": self.seq(wl),
                     "packing": w.get("packing", True), "eval_split": 0.0},
            # the recipe as a user writes it (issue 20): checkpointing, kernels, loss and, on one GPU
            # without offload or SP, the ZeRO stage are left to `auto` (planned for the GPU it runs on)
            "train": {"max_steps": self.a.steps, "micro_batch_size": w["mbs"], "grad_accum": 1, "lr": 1e-5,
                      "warmup_steps": 0},
            "distributed": {"zero": w["zero"] if (w.get("offload") or w.get("sp") or w["gpus"] != 1) else "auto",
                            "offload_optimizer": bool(w.get("offload")),
                            "offload_params": bool(w.get("offload")), "sequence_parallel": w.get("sp", 1)},
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

    def peer_cmd(self, wl: str, extra: list[str], name: str = "") -> list[str]:
        """The peer's torchrun command: peer_trl.py for a trl-* setting, else peer_hf.py."""
        w = WORKLOADS[wl]
        g = self.gpus(wl)[0]
        mode = "full" if w["method"] == "full" else w["method"]
        trl = name.startswith("trl-")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(g),
               TRL_PEER if trl else PEER, mode, "--size", self.size(wl)]
        cmd += [] if trl else ["--seq", str(self.seq(wl))]
        cmd += ["--mbs", str(w["mbs"]), "--steps", str(self.a.steps), "--warmup", str(self.a.warmup)]
        if w.get("offload"):
            cmd.append("--offload")
        if w["method"] != "full" or trl:
            cmd += ["--model-dir", str(model_dir(self.models, self.size(wl)))]
        if w.get("data"):
            data = str(self.data_file(wl)) if w.get("repeat") else w["data"][0]
            cmd += ["--data", data, "--format", w["data"][1], "--tokenizer", TOKENIZER, "--max-len", str(self.seq(wl))]
        return cmd + list(extra)

    def variants(self, wl: str) -> dict[str, list[str]]:
        table = VARIANTS.get(wl, {"default": []})
        keep = self.a.variants
        out = {k: v for k, v in table.items() if keep is None or k in keep}
        out.update(self.a.variant)  # --variant NAME=SETS: always run
        return out

    def peer_settings(self, wl: str) -> dict[str, list[str]]:
        """HF Trainer's settings, TRL's where the workload's peers include "trl", the workload's own;
        --peer-settings filters them, --peer-setting adds one (a trl-* name runs peer_trl.py)."""
        w = WORKLOADS[wl]
        if w.get("peer", True) is False:
            return {}
        table = {**(PEER_SETTINGS if "hf" in w.get("peers", ("hf",)) else {}),
                 **(TRL_SETTINGS if "trl" in w.get("peers", ("hf",)) else {}), **w.get("peer_settings", {})}
        keep = self.a.peer_settings
        out = {k: v for k, v in table.items() if keep is None or k in keep}
        out.update(self.a.peer_setting)
        return out
