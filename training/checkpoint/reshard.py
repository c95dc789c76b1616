"""A checkpoint for another GPU count (issue 13): ZeRO shards -> DeepSpeed's universal format in
`<ckpt>/universal/<tag>/`, once (COMPLETE there caches it for every later resume), spread over
the ranks and the CPU cores, and with no collective open while it runs.

    to_universal(ckpt, rank, world, local_world)    every rank calls; returns the folder to load

ZeRO-3 (zerotune's default) is converted directly: each parameter's fp32 weights and Adam moments
are cut out of every rank's optimizer file (read with torch.load(mmap=True): nothing is loaded
whole) and written as `zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`, the same files, bit for bit,
as deepspeed.checkpoint.ds_to_universal writes (zero/optimizer_state.pt leaves out the flat
partitions it copies along but never reads). Its pass through temporary fragment files (every
byte written and read once more) is skipped. Each rank converts its share of the
parameters in a subprocess with a pool of workers (the cores of the node / its ranks). ZeRO 1-2
checkpoints go through ds_to_universal itself, on rank 0, with as many workers as there are cores.
Every file is read with torch.load(weights_only=True) and the checkpoint allow-list.

Ranks wait on the file system, not on a barrier that the NCCL timeout would end: for parts/<r>.done
of every rank, then for COMPLETE; a failed part (parts/<r>.error) or a rank that shows no sign of
life (parts/<r>.alive stops changing) for STALL_SECONDS is an error naming the folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from zerotune.core.io import atomic_write
from zerotune.core.layout import MARKER, STATE_FILE

UNIVERSAL_DIR = "universal"
STALL_SECONDS = 900    # a converting rank touches its .alive file every few seconds
POLL_SECONDS = 0.5


class ReshardError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- what to convert
def zero3_files(ckpt: Path) -> tuple[list[Path], list[Path]] | None:
    """(model_states, optim_states) files of a plain ZeRO-3 checkpoint, in data-parallel rank
    order; None for ZeRO 1-2 or a layout the direct path does not handle (tensor parallel)."""
    import re
    pattern = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
    found = {"model": {}, "optim": {}}
    for p in ckpt.iterdir():
        m = pattern.match(p.name)
        if m:
            if m.group(2) != "00":
                return None
            found[m.group(3)][int(m.group(1))] = p
    n = len(found["optim"])
    if n == 0 or sorted(found["optim"]) != list(range(n)) or sorted(found["model"]) != list(range(n)):
        return None
    return [found["model"][r] for r in range(n)], [found["optim"][r] for r in range(n)]


def param_shapes(model_file: Path) -> list[dict]:
    """Per ZeRO-3 sub-group: parameter name -> shape, in flat-buffer order."""
    return safe_load(model_file)["param_shapes"]


def split(shapes: list[dict], parts: int) -> list[list[str]]:
    """The parameter names in `parts` shares of about equal size (largest first, to the least
    loaded share): every rank computes the same split."""
    import math
    sizes = sorted(((math.prod(s), n) for group in shapes for n, s in group.items()), key=lambda x: (-x[0], x[1]))
    shares, load = [[] for _ in range(parts)], [0] * parts
    for numel, name in sizes:
        i = load.index(min(load))
        shares[i].append(name)
        load[i] += numel
    return shares


def worker_count(local_world: int, largest_bytes: int, tasks: int) -> int:
    """Processes for this rank: its cores (the node's, shared by its ranks), at most what memory
    allows (a worker holds about 2 copies of the largest parameter) and the number of tasks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 0
    by_memory = available // max(1, local_world * 2 * largest_bytes) if available else cores
    return max(1, min(cores // max(1, local_world), by_memory, tasks))


# ----------------------------------------------------------------------------- loading, safely
def safe_load(path: Path, mmap: bool = False):
    from zerotune.training.checkpoint.safe_load import safe_load as load   # imported here: this module starts without torch
    return load(path, map_location="cpu", mmap=mmap)


# ----------------------------------------------------------------------------- the ZeRO-3 pass
_OPTIM: list = []   # every rank's optimizer state (mmapped), shared with forked workers


def _slices(shapes: list[dict], dp: int) -> dict[str, tuple[int, int, int]]:
    """name -> (sub-group, offset in each rank's flat partition, numel held by a rank): ZeRO-3
    gives each rank ceil(numel / dp) elements of every parameter, the last rank fewer."""
    import math
    out = {}
    for group, names in enumerate(shapes):
        offset = 0
        for name, shape in names.items():
            part = math.ceil(math.prod(shape) / dp)
            out[name] = (group, offset, part)
            offset += part
    return out


def _convert_one(task) -> None:
    import torch
    name, (group, offset, part), numel, out = task
    folder = Path(out) / "zero" / name
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        pieces = []
        for r, sd in enumerate(_OPTIM):
            flat = sd["fp32_flat_groups"][group] if key == "fp32" else sd["optimizer_state_dict"]["state"][group][key]
            n = max(0, min(part, numel - r * part))   # the padding at the end is not the parameter's
            pieces.append(flat.narrow(0, offset, n))
        torch.save(torch.cat(pieces), folder / f"{key}.pt")


def convert_zero3_part(ckpt: Path, out: Path, names: list[str], workers: int) -> None:
    """Write zero/<name>/*.pt for `names` of the ZeRO-3 checkpoint `ckpt` into `out`."""
    import math
    from concurrent.futures import ProcessPoolExecutor
    model_files, optim_files = zero3_files(ckpt)
    shapes = param_shapes(model_files[0])
    numel = {n: math.prod(s) for g in shapes for n, s in g.items()}
    where = _slices(shapes, len(optim_files))
    _OPTIM[:] = [safe_load(f, mmap=True)["optimizer_state_dict"] for f in optim_files]
    for r, sd in enumerate(_OPTIM):   # zerotune never sets hpZ / MiCS groups; refuse rather than guess
        for g in sd.get("ds_zero_partition_groups") or []:
            if g.get("partition_count", len(_OPTIM)) != len(_OPTIM) or g.get("partition_rank", r) != r:
                raise ReshardError(f"{ckpt}: ZeRO-3 partition groups other than one per rank are not supported")
    tasks = [(n, where[n], numel[n], str(out)) for n in names]
    if workers <= 1:
        list(map(_convert_one, tasks))
        return
    import multiprocessing
    # forked: the workers share the mmapped files opened above
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_convert_one, tasks))


def finish_zero3(ckpt: Path, out: Path) -> None:
    """What the parameters' files need beside them: the optimizer's global state (loss scale,
    step, hyper-parameters: all DeepSpeed's ZeRO-3 universal load reads of it; the flat
    partitions are left out, they are in zero/<name>/ already) and the model_states files."""
    import torch
    model_files, optim_files = zero3_files(ckpt)
    sd = safe_load(optim_files[0], mmap=True)["optimizer_state_dict"]
    inner = sd["optimizer_state_dict"]
    inner = {**inner, "state": {k: {"step": v["step"]} for k, v in inner["state"].items()}}
    small = {k: v for k, v in sd.items() if k != "fp32_flat_groups"}
    small.update(optimizer_state_dict=inner, param_groups=inner["param_groups"])
    (out / "zero").mkdir(parents=True, exist_ok=True)
    torch.save(small, out / "zero" / "optimizer_state.pt")
    for f in model_files:
        shutil.copy2(f, out / f.name)


# ----------------------------------------------------------------------------- ZeRO 1-2
def convert_with_deepspeed(ckpt: Path, out: Path, workers: int) -> None:
    """deepspeed.checkpoint.ds_to_universal, in this process, its torch.load calls (only theirs) safe_load.
    inject_missing_state: DeepSpeed records universal_checkpoint_info only for models that set it
    (Megatron); without it a ZeRO 1-2 checkpoint is refused, though data parallelism alone needs none."""
    from deepspeed.checkpoint import ds_to_universal

    from zerotune.training.checkpoint.safe_load import DS_TO_UNIVERSAL, safe_loads_in
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with safe_loads_in(DS_TO_UNIVERSAL):
        ds_to_universal.main(args)


# ----------------------------------------------------------------------------- every rank
def to_universal(ckpt: Path, rank: int, world: int, local_world: int | None = None) -> Path:
    """Every rank calls; returns `<ckpt>/universal/<tag>`, converted by this call or an earlier one."""
    import torch.distributed as dist

    from zerotune.core.errors import CheckpointError
    root = ckpt / UNIVERSAL_DIR
    target, parts = root / ckpt.name, root / "parts"
    if (root / MARKER).is_file():
        return target   # converted by an earlier resume
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)   # an interrupted conversion: start over
        parts.mkdir(parents=True)
    dist.barrier()   # all ranks arrive together (right after building the engine); nothing long runs under it
    converters = world if zero3_files(ckpt) else 1
    local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    try:
        if rank < converters:
            _convert_part(ckpt, target, rank, converters, local_world if converters > 1 else 1, parts)
        if rank == 0:
            wait_for(ckpt, [parts / f"{r}.done" for r in range(converters)], parts)
            if zero3_files(ckpt):
                finish_zero3(ckpt, target)
                (root / "latest_universal").write_text(ckpt.name)   # as ds_to_universal leaves it
            shutil.copy(ckpt / STATE_FILE, target / STATE_FILE)
            atomic_write(root / MARKER, "{}\n")
        else:
            wait_for(ckpt, [root / MARKER], parts)
    except ReshardError as e:
        raise CheckpointError(str(e)) from None
    dist.barrier()
    return target


def _convert_part(ckpt: Path, target: Path, part: int, parts: int, local_world: int, folder: Path) -> None:
    """Run this rank's share in a subprocess (a fresh process: no CUDA or NCCL state under the
    fork of its workers), touching parts/<part>.alive while it runs; .done or .error after."""
    log = folder / f"{part}.log"
    cmd = [sys.executable, "-m", "zerotune.training.checkpoint.reshard", str(ckpt), str(target), "--part", str(part),
           "--parts", str(parts), "--local-world", str(local_world)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        beat = 0
        while True:
            beat += 1
            atomic_write(folder / f"{part}.alive", f"{beat}\n")
            try:
                proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                pass
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        atomic_write(folder / f"{part}.error", f"converting {ckpt} for a new world size failed on rank {part} "
                                               f"(exit code {proc.returncode}; log: {log}):\n{tail}")
        raise ReshardError((folder / f"{part}.error").read_text())
    atomic_write(folder / f"{part}.done", "\n")


def wait_for(ckpt: Path, files: list[Path], parts: Path) -> None:
    """Until every one of `files` exists; an .error of any rank, or no rank showing a sign of
    life for STALL_SECONDS, raises."""
    last, changed = None, time.monotonic()
    while not all(f.is_file() for f in files):
        errors = sorted(parts.glob("*.error"))
        if errors:
            raise ReshardError(errors[0].read_text())
        beat = sorted((p.name, _read(p)) for p in parts.glob("*.alive"))
        if beat != last:
            last, changed = beat, time.monotonic()
        elif time.monotonic() - changed > STALL_SECONDS:
            raise ReshardError(f"converting {ckpt} for a new world size: no progress in {parts.parent} for "
                               f"{STALL_SECONDS} s (a rank stopped?); its logs are {parts}/*.log; "
                               f"remove {parts.parent} and resume again, or resume on {_saved_world(ckpt)} GPUs")
        time.sleep(POLL_SECONDS)


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def _saved_world(ckpt: Path) -> str:
    from zerotune.core.layout import read_state
    try:
        return str(read_state(ckpt)["world_size"])
    except (OSError, ValueError, KeyError):
        return "the saved number of"


def place_step_counts(optimizer) -> int:
    """After a universal load: DeepSpeed sets each parameter's Adam `step` to the tensor of
    zero/optimizer_state.pt as it was read (on the CPU). torch's fused and capturable AdamW need it on
    the parameter's device, where their own load_state_dict puts it, and refuse the step otherwise
    ("state_steps is on cpu, different from other tensors on cuda:0", seen resuming 4 GPUs on 2).
    Moves those steps; returns how many."""
    import torch
    inner = getattr(optimizer, "optimizer", optimizer)   # a ZeRO optimizer wraps the torch one
    defaults = getattr(inner, "defaults", {})
    if not (defaults.get("fused") or defaults.get("capturable")):
        return 0
    moved = 0
    for param, state in inner.state.items():
        step = state.get("step")
        if torch.is_tensor(step) and step.device != param.device:
            state["step"] = step.to(device=param.device, dtype=torch.float32)
            moved += 1
    return moved


# ----------------------------------------------------------------------------- the subprocess
def main(argv: list[str] | None = None) -> int:
    import math
    p = argparse.ArgumentParser(prog="python -m zerotune.training.checkpoint.reshard", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--local-world", type=int, default=1)
    a = p.parse_args(argv)
    files = zero3_files(a.ckpt)
    if files is None:
        largest = max(f.stat().st_size for f in a.ckpt.glob("*_optim_states.pt"))   # a worker loads one whole
        convert_with_deepspeed(a.ckpt, a.out, worker_count(1, largest // 2, len(list(a.ckpt.glob("*_optim_states.pt")))))
        return 0
    shapes = param_shapes(files[0][0])
    names = split(shapes, a.parts)[a.part]
    numel = {n: math.prod(s) for g in shapes for n, s in g.items()}
    largest = 4 * max((numel[n] for n in names), default=1)
    t0 = time.perf_counter()
    workers = worker_count(a.local_world, largest, len(names))
    convert_zero3_part(a.ckpt, a.out, names, workers)
    print(f"converted {len(names)} parameters with {workers} worker(s) in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
