"""PLACEHOLDER: `zerotune preview` is being built (see the open issue)."""
HELP = "(not built yet)"


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    raise SystemExit("zerotune preview: not built yet")
