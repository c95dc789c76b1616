"""`zerotune train RECIPE`: validate, write RUN_DIR, run torchrun on this machine."""
from __future__ import annotations

from zerotune.core.errors import UserError

HELP = "validate a recipe, write RUN_DIR and train on this machine with torchrun"
DESCRIPTION = ("Validate RECIPE, plan every `auto` for this machine's GPUs (nvidia-smi; the smallest counts),\n"
               "refuse a recipe that cannot fit them, write RUN_DIR (recipe.yaml, ds_config.json) and run\n"
               "`torchrun -m zerotune.training RUN_DIR` on this machine.\n\n"
               "  zerotune train recipes/demo.yaml\n"
               "  zerotune train recipes/demo.yaml --set train.lr=1e-4 --set 'data.packing=true' --nproc 2")


def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key; VALUE is YAML (repeatable)")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: visible GPUs, 1 on CPU)")


def check_counts(args) -> None:
    """--nproc (and --nnodes where the command has it) count processes and nodes: 1 or more."""
    for flag, value in (("--nproc", args.nproc), ("--nnodes", getattr(args, "nnodes", None))):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be 1 or more")
    rank, nodes = getattr(args, "node_rank", 0), getattr(args, "nnodes", None) or 1
    if not 0 <= rank < nodes:
        raise UserError(f"--node-rank {rank}: must be 0 to {nodes - 1} (--nnodes {nodes})")


def run(args) -> int:
    from .prepare import prepare_run
    from .gpus import local_gpus
    from .submit import grace_seconds, run_local
    check_counts(args)
    nproc = args.nproc or local_gpus().count or 1
    recipe = prepare_run(args.recipe, args.set, world_size=nproc, lock=True)   # auto planned for the local GPUs; fit check
    print(f"zerotune: run dir {recipe.run_dir} ({nproc} process(es))", flush=True)
    return run_local(recipe.run_dir, nproc, grace_seconds(recipe, nproc))
