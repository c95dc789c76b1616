"""`zerotune` sub-commands: parse, call, print. Errors are one line, never a traceback.

Each sub-command lives in its own module with `HELP`, `add_arguments(parser)` and
`run(args) -> int`; modules keep heavy imports (torch, transformers) inside `run`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pathlib import Path

from zerotune.core import quiet
from zerotune.core.errors import UserError
from zerotune.core.layout import LAUNCHER_LOG, LOGS_DIR, RECIPE_FILE, USER_ERROR_EXIT_CODE

COMMANDS = {
    "train": "zerotune.launcher.train",
    "launch": "zerotune.launcher.launch",
    "plan": "zerotune.launcher.plan_cli",
    "status": "zerotune.launcher.status",
    "report": "zerotune.launcher.report",
    "data": "zerotune.training.data.preview",
    "export": "zerotune.training.export.write",
    "generate": "zerotune.training.model.generate",
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
    with quiet.route(name=args.command):   # other packages' lines -> RUN_DIR/logs/launcher.log (core/quiet.py)
        attach_run_log(args)
        return run(args)


def attach_run_log(args) -> None:
    """A command given a run folder (export, generate, status, report) logs into it."""
    for value in vars(args).values():
        if isinstance(value, str) and (Path(value) / RECIPE_FILE).is_file():
            quiet.attach(Path(value) / LOGS_DIR / LAUNCHER_LOG)
            return


def run(args) -> int:
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        print(f"zerotune: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
