"""`zerotune` sub-commands: parse, call, print. Errors are one line, never a traceback."""
from __future__ import annotations

import argparse
import sys

from training.config import RecipeError


def cmd_train(args) -> int:
    from .prepare import prepare_run
    from .submit import run_local, visible_gpus
    nproc = args.nproc or visible_gpus() or 1
    recipe = prepare_run(args.recipe, args.set, world_size=nproc * recipe_nodes(args))
    print(f"zerotune: run dir {recipe.run_dir} ({nproc} process(es))", flush=True)
    return run_local(recipe.run_dir, nproc)


def recipe_nodes(args) -> int:
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerotune",
        description="Fine-tune causal language models with DeepSpeed ZeRO or PEFT adapters, from one YAML recipe.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="validate a recipe, write RUN_DIR and train on this machine with torchrun",
                       description="Validate RECIPE, write RUN_DIR (recipe.yaml, ds_config.json) and run "
                                   "`torchrun -m training RUN_DIR` on this machine.")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key; VALUE is YAML (e.g. --set train.lr=1e-4 --set 'data.packing=true')")
    t.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: visible GPUs, 1 on CPU)")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        print(f"zerotune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
