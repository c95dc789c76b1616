"""Which trackers a run reports to, and what describes the run to them.

    check_trackers(recipe)       every package `logging.report_to` names is installed, else one
                                 line (torch-free: the launcher can call it before any GPU time)
    open_trackers(run_dir, recipe, start_step, say)   rank 0: the sinks, resumed where the run
                                 already has tracker runs (ids in RUN_DIR/trackers.json)
    run_hparams(recipe, world, total_steps)           the knobs every tracker shows
    config_texts(run_dir, recipe, throughput)         recipe, ds_config, plan, MFU formula, time split
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
from pathlib import Path

from zerotune.core.errors import UserError
from zerotune.core.io import atomic_write
from zerotune.core.layout import DS_CONFIG_FILE, PLAN_FILE, TRACKERS_FILE

from zerotune.training.monitoring.timing import time_text

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # report_to name -> the package it needs
DEFAULT_PROJECT = "zerotune"


class TrackerMissingError(UserError, ImportError):
    """logging.report_to names a tracker whose package is not installed."""


def check_trackers(recipe) -> None:
    for name in recipe.logging.report_to:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise TrackerMissingError(f"logging.report_to: {name} needs the {package} package: "
                                      f"pip install 'zerotune[{name}]'")


# ----------------------------------------------------------------------------- what describes a run
def run_hparams(recipe, world: int, total_steps: int) -> dict:
    """The recipe's main knobs (TensorBoard's HPARAMS tab, wandb config, MLflow params)."""
    r = recipe
    replicas = r.distributed.replicas(world)
    acc = r.train.accumulation(replicas)
    return {"model": str(r.model.path), "method": r.method.kind, "dtype": r.model.dtype, "lr": r.train.lr,
            "scheduler": r.train.scheduler, "micro_batch_size": r.train.micro_batch_size, "grad_accum": acc,
            "world_size": world, "sequence_parallel": r.distributed.sequence_parallel,
            "global_batch": r.train.micro_batch_size * acc * replicas,
            "max_len": r.data.max_len, "packing": r.data.packing, "zero": str(r.distributed.zero),
            "total_steps": total_steps, "seed": r.train.seed}


def config_texts(run_dir: Path, recipe, throughput) -> list[tuple[str, str]]:
    """(tag, markdown) shown once per attempt: the recipe, the DeepSpeed config, the plan, how
    MFU is computed and what the time/* scalars hold."""
    out = [("config/recipe", "```yaml\n" + recipe.to_yaml() + "\n```")]
    for tag, name, lang in (("config/ds_config", DS_CONFIG_FILE, "json"), ("config/plan", PLAN_FILE, ""),
                            ("config/plan", "plan.md", ""), ("config/plan", "plan.json", "json")):
        path = Path(run_dir) / name
        if path.is_file():
            out.append((tag, f"```{lang}\n{path.read_text()}\n```"))
    out.append(("config/mfu", throughput.mfu_text()))
    out.append(("config/time", time_text()))
    return out


# ----------------------------------------------------------------------------- tracker runs across attempts
def read_ids(run_dir: Path) -> dict:
    path = Path(run_dir) / TRACKERS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def write_ids(run_dir: Path, ids: dict) -> None:
    atomic_write(Path(run_dir) / TRACKERS_FILE, json.dumps(ids, indent=1) + "\n")


def _new_wandb_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def open_trackers(run_dir: Path, recipe, start_step: int, say) -> list:
    """The sinks of `logging.report_to` (rank 0 only). The ids of the wandb and MLflow runs are
    kept in RUN_DIR/trackers.json, so every attempt of this run (a resume, a requeue) reports to
    the same tracker runs; a fresh start with checkpoint.resume: never starts new ones."""
    from zerotune.training.monitoring import trackers
    check_trackers(recipe)
    fresh = start_step == 0 and recipe.checkpoint.resume == "never"
    ids = {} if fresh else read_ids(run_dir)
    project = recipe.logging.project  # else each tracker's own variable, else "zerotune"
    out = []
    for name in recipe.logging.report_to:
        if name == "tensorboard":
            out.append(trackers.TensorBoardTracker(run_dir, start_step))
        elif name == "wandb":
            known = ids.get("wandb", {})
            ids["wandb"] = {"id": known.get("id") or _new_wandb_id(), "project": known.get("project") or project
                            or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT}
            write_ids(run_dir, ids)  # before init: a crash inside it still resumes this id
            out.append(trackers.WandbTracker(run_dir, recipe, ids["wandb"]["id"], ids["wandb"]["project"]))
        elif name == "mlflow":
            known = ids.get("mlflow", {}).get("run_id")
            experiment = project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            t = trackers.MlflowTracker(run_dir, recipe, known, experiment)
            if known and not t.reopened:
                say(f"WARNING: mlflow run {known} is not in {t.uri}: reporting to a new run {t.run_id}")
            ids["mlflow"] = {"run_id": t.run_id, "uri": t.uri}
            write_ids(run_dir, ids)
            out.append(t)
    return out
