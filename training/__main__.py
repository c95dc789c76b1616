"""`python -m zerotune.training RUN_DIR`: what torchrun starts on every rank.

The stop-signal handlers come first (training/run/signals.py), before the heavy imports; an error
is printed once as one line, its traceback in RUN_DIR/logs/rank-<N>.log (core/failure.py).
"""
import os
import sys
import time

from zerotune.training.run.heartbeat import die_with_parent
from zerotune.training.run.signals import StopRequest

die_with_parent()                # a launcher killed outright (SIGKILL, OOM) takes its ranks with it
STOP = StopRequest().install()   # SIGINT/SIGTERM/SIGUSR1 while torch loads: remembered, not fatal
STARTED = time.time()

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed APIs that torch 2.11+ deprecates, once per collective:
# silence exactly those, so the console shows the run.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

from zerotune.core import failure, quiet, runlock  # noqa: E402
from zerotune.core.layout import INTERRUPT_EXIT_CODE, latest_complete, rank_log  # noqa: E402
from zerotune.training.run import ds_ops, faults  # noqa: E402


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m zerotune.training RUN_DIR", file=sys.stderr)
        return 2
    run_dir, rank = Path(sys.argv[1]), int(os.environ.get("RANK", "0"))
    with quiet.route(rank_log(run_dir, rank), fds=True, verbose=quiet.run_verbose(run_dir)):  # others -> the log
        return run(run_dir, rank)


def run(run_dir: Path, rank: int) -> int:
    started = failure.attempt_started(STARTED)
    try:
        ds_ops.use_environment_cache()
        faults.install_from_env()  # tests only: patches nothing unless a ZEROTUNE_TEST_* variable is set
        from zerotune.training.run.loop import train
        ds_ops.announce_builds(int(os.environ.get("LOCAL_RANK", "0")))
        return train(run_dir, STOP, started)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        if rank == 0:
            newest = latest_complete(run_dir)
            print(f"zerotune: stopped at once; a resume starts from {newest.name if newest else 'scratch'}",
                  file=sys.stderr, flush=True)
        return INTERRUPT_EXIT_CODE
    except Exception as e:  # SystemExit (the OOM guard's exit code) passes through
        return failure.report(run_dir, rank, e, started)
    finally:
        runlock.release(run_dir)   # rank 0 under plain torchrun took RUN_DIR/LOCK itself (else a no-op)


def leave(code) -> None:
    """Exit with `code`. A rank of a multi-rank run leaves without the interpreter's native
    teardown: with gloo's threads or a process group still about (an error path, the OOM guard's
    exit, and now and then after a run that ended normally and destroyed its group) that teardown
    can abort inside torch ("terminate called without an active exception": SIGABRT, and a run
    that finished exits non-zero). Such a rank runs Python's exit handlers, flushes its output
    (the loop has closed the trackers and the checkpoint writer) and leaves at once. A single
    process exits the usual way."""
    if code is None:                 # SystemExit()
        code = 0
    elif not isinstance(code, int):  # SystemExit("message")
        print(code, file=sys.stderr)
        code = 1
    dist = sys.modules.get("torch.distributed")
    grouped = dist is not None and dist.is_available() and dist.is_initialized()
    if grouped or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    try:
        exit_code = main()
    except SystemExit as e:
        exit_code = e.code
    leave(exit_code)
