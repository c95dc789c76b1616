"""`zerotune launch RECIPE`: write RUN_DIR (recipe.yaml, ds_config.json) and a launch script,
then run it (torchrun on this node) or submit it (Slurm).

  zerotune launch recipe.yaml                         # RUN_DIR/launch.sh on all local GPUs, run it
  zerotune launch recipe.yaml --nnodes 2 --node-rank 0 --master-addr 10.0.0.1   # on each node
  zerotune launch recipe.yaml --slurm                 # RUN_DIR/job.sbatch, not submitted
  zerotune launch recipe.yaml --slurm --submit        # sbatch --parsable; prints the job id
"""
from __future__ import annotations

import sys
from pathlib import Path

from zerotune.core.io import atomic_write

HELP = "write RUN_DIR and a torchrun (launch.sh) or Slurm (job.sbatch) script, then run or submit it"
DESCRIPTION = __doc__.split("\n", 2)[2] if __doc__ else HELP


def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key; VALUE is YAML (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="write the files and print the script, run nothing")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per node (default: cluster.gpus_per_node, else visible GPUs, else 1)")
    p.add_argument("--nnodes", type=int, default=None, help="nodes of a manual multi-node start (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank in a manual multi-node start")
    p.add_argument("--master-addr", default=None, help="host of the c10d rendezvous (node 0)")
    p.add_argument("--master-port", type=int, default=29500, help="port of the c10d rendezvous (default 29500)")
    p.add_argument("--gpu-memory", default=None,
                   help="memory of one GPU to plan for (default: the local GPUs' (nvidia-smi); with --slurm "
                        "cluster.gpu_memory; else 80GB, assumed)")
    p.add_argument("--slurm", action="store_true", help="write RUN_DIR/job.sbatch for cluster.nodes nodes")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit it with sbatch and print the job id")


def processes_per_node(args, recipe_gpus) -> int:
    if args.nproc:
        return args.nproc
    if recipe_gpus:
        return recipe_gpus
    if args.slurm:
        return 1
    from .gpus import local_gpus
    return local_gpus().count or 1


def _has_gpus() -> bool:
    from .gpus import local_gpus
    return local_gpus().count > 0


def run(args) -> int:
    from zerotune.core import runlock
    from zerotune.core.recipe import RecipeError
    from zerotune.core.recipe_load import load_recipe

    from . import scripts, submit
    from .prepare import prepare_run
    from .train import check_counts

    check_counts(args)
    if args.submit and not args.slurm:
        raise RecipeError("--submit needs --slurm")
    if args.slurm and (args.nnodes or args.master_addr):
        raise RecipeError("--slurm takes the node count from cluster.nodes; --nnodes/--master-addr are for manual starts")
    draft = load_recipe(args.recipe, args.set)
    nproc = processes_per_node(args, draft.cluster.gpus_per_node)
    nnodes = draft.cluster.nodes if args.slurm else (args.nnodes or 1)
    on_gpus = draft.cluster.gpus_per_node if args.slurm else (args.nproc is None and _has_gpus())
    # the fit check (prepare_run, before anything is written or any GPU time is spent) runs on GPUs
    # and wherever the GPU memory is known (nvidia-smi, --gpu-memory, cluster.gpu_memory)
    recipe = prepare_run(args.recipe, args.set, world_size=nproc * nnodes, nodes=nnodes, gpu_flag=args.gpu_memory,
                         slurm=args.slurm, fit_check=True if on_gpus else None, lock=args.node_rank == 0)
    run_dir = recipe.run_dir.resolve()
    if args.slurm or args.dry_run:   # the job (or a later launch.sh) takes RUN_DIR/LOCK itself
        runlock.release(run_dir)
    workdir = Path.cwd()

    if args.slurm:
        path = run_dir / scripts.SBATCH_SCRIPT
        atomic_write(path, scripts.sbatch_script(recipe, run_dir, nproc, workdir), executable=True)
    else:
        path = run_dir / scripts.LAUNCH_SCRIPT
        atomic_write(path, scripts.launch_script(recipe, run_dir, nproc, nnodes, args.node_rank,
                                                     args.master_addr, args.master_port, workdir), executable=True)
    print(f"zerotune: wrote {path} ({nnodes} node(s) x {nproc} process(es), ZeRO-{recipe.distributed.zero})",
          file=sys.stderr, flush=True)

    if args.dry_run:
        print(path.read_text(), end="")
        return 0
    if args.slurm and not args.submit:
        print(f"zerotune: submit it with: zerotune launch {args.recipe} --slurm --submit", file=sys.stderr)
        return 0
    if args.slurm:
        job_id = submit.sbatch(path, scripts.path_options(run_dir, workdir))
        submit.save_job_id(run_dir, job_id)
        print(job_id, flush=True)
        return 0
    return submit.run_script(path)
