"""An error raised on a rank: printed once, as one line, with the full traceback in
RUN_DIR/logs/rank-<N>.log, and the reason in RUN_DIR/FAILED for `zerotune status`.

Several ranks often fail alike (a recipe or data error reaches every rank as the same line)
or one after another (a rank dies, its peers' collectives then fail): the first failure of
the attempt claims RUN_DIR/FAILED under a lock and is the only one printed; later ones go to
their rank's log only. An attempt starts when the supervisor (launcher/agent.py) starts, passed
to the ranks as ZEROTUNE_ATTEMPT_STARTED; a FAILED file older than that is an earlier
attempt's and is cleared by rank 0 at start.

  UserError (RecipeError, DataError, CheckpointError, ...)  `zerotune: error: <message>`, exit 2
  anything else (a bug, a lost peer)                        its traceback and one line naming
                                                            the rank and the log, exit 1
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from zerotune.core import quiet
from zerotune.core.errors import UserError
from zerotune.core.io import atomic_write
from zerotune.core.layout import FAILED_FILE, LOGS_DIR, USER_ERROR_EXIT_CODE, rank_log

ATTEMPT_ENV = "ZEROTUNE_ATTEMPT_STARTED"


def attempt_started(default: float) -> float:
    try:
        return float(os.environ[ATTEMPT_ENV])
    except (KeyError, ValueError):
        return default


def clear_stale(run_dir: Path, started: float) -> None:
    """Rank 0, as an attempt starts: an earlier attempt's FAILED is history."""
    failed = Path(run_dir) / FAILED_FILE
    with contextlib.suppress(OSError):
        if failed.stat().st_mtime < started:
            failed.unlink()


@contextlib.contextmanager
def _locked(run_dir: Path):
    folder = Path(run_dir) / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".failure.lock", "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: at worst two ranks print the same line
        yield


def claim(run_dir: Path, reason: str, started: float) -> bool:
    """Write RUN_DIR/FAILED unless another rank of this attempt did; True for the first."""
    failed = Path(run_dir) / FAILED_FILE
    with _locked(run_dir):
        with contextlib.suppress(OSError):
            if failed.stat().st_mtime >= started:
                return False
        with contextlib.suppress(OSError):
            atomic_write(failed, reason.rstrip() + "\n")
        return True


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_log(run_dir: Path, rank: int, e: BaseException) -> Path:
    path = rank_log(run_dir, rank)
    with contextlib.suppress(OSError):
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}, pid {os.getpid()} on "
                    f"{socket.gethostname()}\n{''.join(traceback.format_exception(e))}")
    return path


def report(run_dir: Path, rank: int, e: BaseException, started: float) -> int:
    """Log, claim and print an exception that ends this rank; returns the exit code."""
    exists = Path(run_dir).is_dir()
    shown = write_log(run_dir, rank, e).relative_to(run_dir) if exists else "no run folder"
    if isinstance(e, UserError):
        reason, code = one_line(e), USER_ERROR_EXIT_CODE
    else:
        reason, code = f"rank {rank}: {type(e).__name__}: {one_line(e)} (traceback in {shown})", 1
    if not getattr(e, "said", False):
        say_first(run_dir, reason, started, traceback_of=None if code == USER_ERROR_EXIT_CODE else e)
    return code


def say_first(run_dir: Path, reason: str, started: float, traceback_of: BaseException | None = None) -> bool:
    """Claim RUN_DIR/FAILED for this attempt and, when first, print the one line (after the
    traceback of a bug). A rank whose failure will make its peers fail (it removes files they
    write) says its reason at once, marks the error `said`, and report() does not say it again."""
    if Path(run_dir).is_dir() and not claim(run_dir, reason, started):
        return False
    if traceback_of is not None:
        traceback.print_exception(traceback_of, file=quiet.console())   # not through the log (core/quiet.py)
    print(f"zerotune: error: {reason}", file=sys.stderr, flush=True)
    return True
