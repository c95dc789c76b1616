"""A quiet console: zerotune's own lines (messages, progress, errors) on the terminal; what other
packages write (warnings, banners, logging, C/C++ output) in RUN_DIR/logs, never lost.

Who wrote a line is decided where it is written: `route()` makes sys.stdout and sys.stderr Routed
streams that send a write to the terminal when the Python code calling write() (print, .write)
is zerotune's own (a module named zerotune.* or __main__) or no Python code at all (the
interpreter printing an uncaught traceback), and to the log otherwise: warnings.showwarning,
logging handlers, tqdm bars and print() of other packages all write from their own modules.
A rank (`route(..., fds=True)`) also points file descriptors 1 and 2 at its log, so C/C++ output
(gloo, compilers) and handlers made before routing land there too; the terminal is kept on dups.

    RUN_DIR/logs/launcher.log   the command's (zerotune train, launch, export, generate, status)
    RUN_DIR/logs/rank-<N>.log   each rank's (and its error's traceback: core/failure.py)

Until a command knows its RUN_DIR the lines wait in memory (`attach` writes them out); a command
that never learns one (plan, data, a model folder) leaves them in ~/.cache/zerotune/logs/<cmd>.log.
`logging.verbose: true` in the recipe, or ZEROTUNE_VERBOSE=1, shows everything as before.
zerotune code that must reach the terminal through another package (its tqdm bar, a traceback it
prints) writes to `console()`.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

VERBOSE_ENV = "ZEROTUNE_VERBOSE"


def verbose_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _ours() -> bool:
    try:
        frame = sys._getframe(2)   # 0: _ours, 1: Routed.write, 2: who wrote
    except ValueError:
        return True                # no Python caller: the interpreter's own traceback
    name = frame.f_globals.get("__name__", "")
    return name == "__main__" or name.startswith("zerotune.") or name == "zerotune"


class Log:
    """The other packages' lines: in memory until a file is known."""

    def __init__(self):
        self.pending, self.file, self.path = io.StringIO(), None, None

    def write(self, text: str) -> int:
        if self.file is None and self.path is not None and text:
            self._open()
        return (self.file or self.pending).write(text)

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def attach(self, path: Path, eager: bool = False) -> None:
        """The log file from now on; created at the first line to write (a command that wrote
        nothing leaves no empty log behind, e.g. in a run folder an export refused to touch),
        or at once with `eager` (a rank points its descriptors 1 and 2 at it)."""
        if self.path is not None:
            return
        self.path = Path(path)
        if eager or self.pending.getvalue():
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        self.file.write(self.pending.getvalue())
        self.pending = io.StringIO()


class Routed(io.TextIOBase):
    def __init__(self, console, log: Log):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        return (self.console if _ours() else self.log).write(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self):
        return getattr(self.console, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


_LOG: Log | None = None


def console():
    """The terminal's stderr, whoever writes (zerotune's progress bar, a traceback it prints)."""
    return sys.stderr.console if isinstance(sys.stderr, Routed) else sys.stderr


def _terminal(fd: int, stream):
    """A stream on a dup of `fd` (which will then point at the log)."""
    stream.flush()
    return open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)


@contextlib.contextmanager
def route(log_path: Path | None = None, fds: bool = False, verbose: bool = False, name: str = "zerotune"):
    """Route sys.stdout / sys.stderr (and with `fds`, descriptors 1 and 2) for the block; `name`:
    the command, naming the log of one that never learns its RUN_DIR."""
    global _LOG
    if verbose or verbose_env() or isinstance(sys.stderr, Routed):
        yield
        return
    log = _LOG = Log()
    if log_path is not None:
        log.attach(log_path, eager=fds)
    saved = sys.stdout, sys.stderr
    out, err = (_terminal(1, sys.stdout), _terminal(2, sys.stderr)) if fds else saved
    if fds and log.file is not None:
        os.dup2(log.file.fileno(), 1)
        os.dup2(log.file.fileno(), 2)
    sys.stdout, sys.stderr = Routed(out, log), Routed(err, log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        if not fds:
            _LOG = None
            _leave(log, name)


def _leave(log: Log, name: str) -> None:
    if log.path is None and log.pending.getvalue():
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        with contextlib.suppress(OSError):
            log.attach(home / "zerotune" / "logs" / f"{name}.log")
    if log.file is not None:
        log.file.close()


def run_verbose(run_dir: Path) -> bool:
    """logging.verbose of RUN_DIR/recipe.yaml (read before anything else is imported on a rank)."""
    import yaml
    try:
        recipe = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
        return bool((recipe.get("logging") or {}).get("verbose"))
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def attach(path: Path) -> None:
    """The command now knows its log file (RUN_DIR/logs/launcher.log): write what waited."""
    if _LOG is not None:
        with contextlib.suppress(OSError):
            _LOG.attach(Path(path))


def show_all() -> None:
    """logging.verbose: true, learnt once the recipe is read: what waited and what follows go to
    the terminal."""
    global _LOG
    if _LOG is None or not isinstance(sys.stderr, Routed):
        return
    sys.stderr.console.write(_LOG.pending.getvalue())
    _LOG.pending = io.StringIO()
    sys.stdout, sys.stderr = sys.stdout.console, sys.stderr.console
    _LOG = None
