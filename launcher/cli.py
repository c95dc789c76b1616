"""`zerotune` sub-commands: parse, call, print. Errors are one line, never a traceback.

Each sub-command lives in its own module with `HELP`, `add_arguments(parser)` and
`run(args) -> int`; modules keep heavy imports (torch, transformers) inside `run`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from training.config import RecipeError

COMMANDS = {
    "train": "launcher.train",
    "launch": "launcher.launch",
    "plan": "launcher.plan",
    "status": "launcher.status",
    "report": "launcher.report",
    "data": "training.data.preview",
    "export": "training.export",
    "generate": "training.generate",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerotune",
        description="Fine-tune causal language models with DeepSpeed ZeRO or PEFT adapters, from one YAML recipe.",
        epilog="`zerotune COMMAND --help` explains each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(func=module.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, FileNotFoundError) as e:
        print(f"zerotune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # data and other user-facing errors define `user_facing = True`
        if getattr(e, "user_facing", False):
            print(f"zerotune: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
