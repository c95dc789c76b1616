"""Renders RUN_DIR/launch.sh (torchrun) and RUN_DIR/job.sbatch (Slurm) from the slurm/ templates.

Nothing from the recipe reaches a script unquoted: paths, the interpreter and environment
values are single-quoted with shlex.quote (safe for spaces, quotes, $(), backticks, newlines);
`#SBATCH` lines only hold values the schema validated as plain tokens (core/recipe.py,
ClusterConfig), and paths only when they are plain too (else they go on sbatch's command line).
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Optional

from zerotune.core.layout import ATTEMPTS_FILE, LAUNCH_SCRIPT, REQUEUE_EXIT_CODE, SBATCH_SCRIPT
from zerotune.core.recipe import Recipe, RecipeError

TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"
PLAIN_PATH = re.compile(r"^[A-Za-z0-9._/+@:,=-]+$")   # no spaces, quotes, %, $ or newlines
HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$|^\[?[0-9A-Fa-f:.]+\]?$")


def render_template(name: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{(\w+)\}\}", text)
    if left:
        raise RuntimeError(f"slurm/{name}: no value for {', '.join(sorted(set(left)))}")
    return text


def env_lines(recipe: Recipe) -> str:
    """cluster.env as `export KEY='value'` lines (keys are validated identifiers)."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in recipe.cluster.env.items())


def omp_threads(cpus_per_node: Optional[int], nproc: int) -> int:
    return max(1, (cpus_per_node or nproc) // max(1, nproc))


def stop_times(recipe: Recipe, nproc: int) -> tuple[int, int]:
    """(grace, lead): the seconds a stop may take before SIGKILL (the planner's save-time
    estimate, launcher/submit.py), and Slurm's USR1 lead before the time limit: at least the
    grace, and cluster.signal_grace_s when that is longer."""
    from .submit import grace_seconds
    grace = grace_seconds(recipe, nproc, recipe.cluster.nodes)
    return grace, max(grace, recipe.cluster.signal_grace_s)


def _common(recipe: Recipe, run_dir: Path, workdir: Path, python: str) -> dict[str, str]:
    return {
        "name": recipe.name,
        "run_dir": shlex.quote(str(run_dir)),
        "workdir": shlex.quote(str(workdir)),
        "python": shlex.quote(python),
        "requeue_code": str(REQUEUE_EXIT_CODE),
        "env_lines": env_lines(recipe),
    }


def launch_script(recipe: Recipe, run_dir: Path, nproc: int, nnodes: int = 1, node_rank: int = 0,
                  master_addr: Optional[str] = None, master_port: int = 29500,
                  workdir: Optional[Path] = None, python: Optional[str] = None) -> str:
    """launch.sh: torchrun on this node; with nnodes > 1, a c10d rendezvous at master_addr."""
    if nnodes > 1:
        if not master_addr or not HOST.match(master_addr):
            raise RecipeError(f"--master-addr: {master_addr!r} is not a host name or IP address")
        if not 0 <= node_rank < nnodes:
            raise RecipeError(f"--node-rank: {node_rank} is not in 0..{nnodes - 1}")
        if not 1 <= master_port <= 65535:
            raise RecipeError(f"--master-port: {master_port} is not a TCP port")
        args = (f"--nnodes={nnodes} --node-rank={node_rank} --nproc-per-node={nproc} --rdzv-backend=c10d "
                f"--rdzv-endpoint={master_addr}:{master_port} --rdzv-id={recipe.name} --max-restarts=0")
        mode = (f"Node {node_rank} of {nnodes}: run the same script (with its --node-rank) on every node; "
                f"they meet at {master_addr}:{master_port}.")
    else:
        args = f"--standalone --nproc-per-node={nproc} --max-restarts=0"
        mode = f"Single node, {nproc} process(es)."
    values = _common(recipe, run_dir, workdir or Path.cwd(), python or sys.executable)
    values.update(torchrun_args=args, mode_comment=mode, grace=str(stop_times(recipe, nproc)[0]),
                  omp_threads=str(omp_threads(recipe.cluster.cpus_per_task, nproc)))
    return render_template(LAUNCH_SCRIPT, values)


def sbatch_options(recipe: Recipe, run_dir: Path, nproc: int, workdir: Path) -> list[str]:
    """The `--option=value` list for #SBATCH lines (and, for paths, sbatch's command line)."""
    c = recipe.cluster
    opts = [f"--job-name={recipe.name}", f"--nodes={c.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={c.cpus_per_task or nproc}"]
    if c.gres:
        opts.append(f"--gres={c.gres}")
    elif c.gpus_per_node:
        opts.append(f"--gpus-per-node={c.gpus_per_node}")
    for key in ("mem", "time", "partition", "account", "qos", "constraint"):
        value = getattr(c, key)
        if value is not None:
            opts.append(f"--{key}={value}")
    if c.exclusive:
        opts.append("--exclusive")
    opts += ["--requeue", "--open-mode=append", f"--signal=B:USR1@{stop_times(recipe, nproc)[1]}"]
    opts += path_options(run_dir, workdir)
    opts += c.extra_sbatch
    return opts


def path_options(run_dir: Path, workdir: Path) -> list[str]:
    """Log files in RUN_DIR (%j: job id; the requeued job appends to the same files)."""
    return [f"--output={run_dir}/slurm-%j.out", f"--error={run_dir}/slurm-%j.err", f"--chdir={workdir}"]


def sbatch_script(recipe: Recipe, run_dir: Path, nproc: int, workdir: Optional[Path] = None,
                  python: Optional[str] = None) -> str:
    workdir = workdir or Path.cwd()
    plain = PLAIN_PATH.match(str(run_dir)) and PLAIN_PATH.match(str(workdir))
    lines = []
    for opt in sbatch_options(recipe, run_dir, nproc, workdir):
        is_path = opt.startswith(("--output=", "--error=", "--chdir="))
        if is_path and not plain:
            continue  # a path sbatch cannot read from a #SBATCH line: it goes on the command line
        lines.append(f"#SBATCH {opt}")
    if not plain:
        lines.append("# RUN_DIR or the working directory holds characters #SBATCH lines cannot carry:")
        lines.append("# `zerotune launch --slurm --submit` passes --output, --error and --chdir to sbatch.")
    hint = "sbatch " + " ".join(shlex.quote(o) for o in path_options(run_dir, workdir)) + " " + \
        shlex.quote(str(run_dir / SBATCH_SCRIPT))
    image = getattr(recipe.cluster, "container_image", None)   # pyxis/enroot, when the schema has it
    container = ""
    if image:
        mounts = getattr(recipe.cluster, "container_mounts", None) or []
        container = f"--container-image={shlex.quote(image)} --no-container-entrypoint "
        if mounts:
            container += f"--container-mounts={shlex.quote(','.join(mounts))} "
        python = python or "python"   # the image's interpreter, not the launcher's
    values = _common(recipe, run_dir, workdir, python or sys.executable)
    grace, lead = stop_times(recipe, nproc)
    values.update(srun_container=container, sbatch_lines="\n".join(lines), grace=str(grace), lead=str(lead),
                  nproc=str(nproc), max_requeues=str(recipe.cluster.max_requeues), attempts_file=ATTEMPTS_FILE,
                  omp_threads=str(omp_threads(recipe.cluster.cpus_per_task, nproc)),
                  submit_hint=hint.replace("\n", "\\n"))
    return render_template(SBATCH_SCRIPT, values)
