"""The GPU memory a run is planned for: every `auto` (launcher/prepare.py) and the fit check are
chosen against it. Torch-free (the CLI starts without torch): the local GPUs are read from
`nvidia-smi --query-gpu=index,uuid,memory.total,compute_cap --format=csv,noheader,nounits` (MiB per
GPU; the smallest GPU and the lowest compute capability count), CUDA_VISIBLE_DEVICES applied
(indices or UUIDs, as CUDA reads it): one query gives how many processes `zerotune train` /
`launch` start, the memory planned for and the capability train.precision: auto reads (a driver
too old for compute_cap is asked again without it: capability unknown).

Where the size comes from, first match:
  --gpu-memory SIZE                 (zerotune launch / plan)
  a Slurm submit: cluster.gpu_memory (the login node's GPUs are not the job's)
  a local run: the local GPUs (nvidia-smi), else cluster.gpu_memory
  else DEFAULT_GPU_MEMORY (80 GiB), *assumed*: the line that prints the choice says so.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from dataclasses import dataclass
from typing import NamedTuple, Optional

from zerotune.core.io import GIB, parse_size
from zerotune.core.io import read_model_config
from zerotune.core.memory import DEFAULT_GPU_MEMORY, LIGER_FAMILIES
from zerotune.core.recipe import RecipeError

MIB = 1 << 20
FIELDS = "index,uuid,memory.total,compute_cap"


class LocalGpus(NamedTuple):
    count: int                                   # GPUs this process may use
    memory: Optional[float]                      # bytes of the smallest
    capability: Optional[tuple[int, int]] = None  # the lowest compute capability, e.g. (9, 0)


@dataclass(frozen=True)
class GpuMemory:
    bytes: float         # memory of one GPU planned for
    source: str          # "nvidia-smi", "--gpu-memory", "cluster.gpu_memory" or "assumed"
    where: str = "local"  # "local": runs here, no GPU seen (a CPU run); "gpus": here, on GPUs; "slurm": a job's GPUs
    capability: Optional[tuple[int, int]] = None   # the local GPUs' lowest compute capability (where "gpus")

    @property
    def known(self) -> bool:
        return self.source != "assumed"

    def describe(self) -> str:
        """'140.4 GiB per GPU (nvidia-smi)' / 'a CPU run (...)' / '80 GiB per GPU (assumed: ...)'."""
        size = f"{self.bytes / GIB:.1f}".removesuffix(".0") + " GiB per GPU"
        if self.known:
            return f"{size} ({self.source})"
        if self.where == "local":
            return f"a CPU run (no GPU seen here; auto chosen as for {size.removesuffix(' per GPU')} GPUs)"
        return f"{size} (assumed: no GPU memory known; set cluster.gpu_memory or --gpu-memory)"

    def recorded(self) -> str:
        """The value RUN_DIR/recipe.yaml keeps in cluster.gpu_memory."""
        return f"{self.bytes / GIB:.1f}GiB"


def _visible(rows: list[tuple]) -> list[tuple]:
    """The rows CUDA_VISIBLE_DEVICES leaves, in its order (an index or a UUID prefix each; CUDA
    stops at the first entry that names no GPU; set but empty: none)."""
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    if setting is None:
        return rows
    out = []
    for entry in (e.strip() for e in setting.split(",") if e.strip()):
        match = [r for r in rows if entry == r[0] or (entry.startswith("GPU-") and r[1].startswith(entry))]
        if not match or match[0] in out:
            break
        out.append(match[0])
    return out


def _query(fields: str) -> Optional[str]:
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def local_gpus() -> LocalGpus:
    """The GPUs this process may use (module docstring), from one nvidia-smi query, CUDA_VISIBLE_DEVICES
    applied; LocalGpus(0, None) without nvidia-smi or GPUs."""
    out = _query(FIELDS)
    if out is None:
        out = _query(FIELDS.removesuffix(",compute_cap"))
    rows = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            cap = tuple(int(p) for p in parts[3].split(".")[:2]) if len(parts) > 3 and re.fullmatch(r"\d+\.\d+", parts[3]) else None
            rows.append((parts[0], parts[1], float(parts[2]) * MIB, cap))
        except (IndexError, ValueError):
            continue
    rows = _visible(rows)
    if not rows:
        return LocalGpus(0, None)
    caps = [r[3] for r in rows]
    return LocalGpus(len(rows), min(r[2] for r in rows), None if None in caps else min(caps))


def planned_gpu_memory(recipe, flag: Optional[str] = None, slurm: bool = False) -> GpuMemory:
    """The GPU memory `recipe` is planned for (module docstring)."""
    local = LocalGpus(0, None) if slurm else local_gpus()
    where = "slurm" if slurm else ("gpus" if local.memory is not None else "local")
    if flag:
        return GpuMemory(parse_size(flag), "--gpu-memory", where, local.capability)
    if local.memory is not None:
        return GpuMemory(local.memory, "nvidia-smi", where, local.capability)
    if recipe.cluster.gpu_memory:
        return GpuMemory(parse_size(recipe.cluster.gpu_memory), "cluster.gpu_memory", where)
    return GpuMemory(DEFAULT_GPU_MEMORY, "assumed", where)


def kernels_for(recipe, gpu: GpuMemory) -> str:
    """model.kernels as the run gets it: `liger` without the liger-kernel package is a one-line
    error here, before torchrun; `auto` on local GPUs (read by nvidia-smi) becomes liger when the
    package is installed and the family is supported, else none; a Slurm job's auto stays auto (its
    ranks decide: training/model/kernels.py) and the planner does not count liger's savings."""
    setting, has = recipe.model.kernels, importlib.util.find_spec("liger_kernel") is not None
    if setting == "liger" and not has:
        raise RecipeError("model.kernels: liger needs the liger-kernel package (pip install 'zerotune[gpu]'), "
                          "not installed in this environment")
    if setting != "auto" or gpu.where == "slurm":
        return setting
    local = gpu.where == "gpus" and has
    return "liger" if local and read_model_config(recipe.model.path).get("model_type") in LIGER_FAMILIES else "none"
