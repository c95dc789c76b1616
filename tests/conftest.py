"""Shared test fixtures: real files from examples/, recipes written into tmp dirs, a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
STORIES = EXAMPLES / "stories260K"
ALPACA = EXAMPLES / "data" / "alpaca" / "alpaca_en_demo.json"
SHAREGPT = EXAMPLES / "data" / "sharegpt" / "dummy_conversation.json"
MESSAGES = EXAMPLES / "data" / "sharegpt" / "dummy_conversation.messages.jsonl"
PHI3_TOKENIZER = EXAMPLES / "tokenizers" / "phi-3-mini"


def base_recipe(tmp_path: Path, **sections) -> dict:
    """A small, fast recipe for stories260K on a slice of the Alpaca demo data (fp32, CPU)."""
    r = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(STORIES), "dtype": "fp32", "chat_template": "alpaca"},
        "method": {"kind": "full"},
        "data": {"train": [{"path": str(ALPACA), "format": "alpaca"}], "max_len": 128},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 0,
                  "gradient_checkpointing": False},
        "distributed": {"zero": 3},
        "logging": {"progress": False},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(r.get(k), dict):
            r[k] = {**r[k], **v}
        else:
            r[k] = v
    return r


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss from RUN_DIR/metrics.jsonl, the last record of each step (a resumed run
    logs the steps after its checkpoint again)."""
    import json
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def without_data_warnings(err: str) -> str:
    """stderr less the data's own warnings (prompts over data.max_len...), which the plan prints
    first because it reads the tokenized data: what is left is the command's own message."""
    return "".join(ln for ln in err.splitlines(keepends=True) if not ln.startswith("zerotune: warning: data."))


def zerotune(*args: str, check: bool = True, timeout: int = 900, env: dict | None = None, cwd=None):
    """Run the CLI in a subprocess (as a user would); returns CompletedProcess with text output."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "zerotune.launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"zerotune {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def recipe_file(tmp_path):
    """recipe_file(**sections) -> path of a written small recipe."""
    def make(**sections):
        return write_recipe(tmp_path, base_recipe(tmp_path, **sections))
    return make
