#!/bin/bash
# shellcheck disable=SC2016  # recipe values are single-quoted on purpose: nothing in them expands
# zerotune torchrun launch for run {{name}}, written by `zerotune launch` from slurm/launch.sh.
# {{mode_comment}}
# Ctrl-C (SIGINT) saves a checkpoint at the next step and exits 130; a second Ctrl-C stops at
# once. SIGTERM or SIGUSR1 (`kill -USR1 <pid of this script>`) saves and exits {{requeue_code}}.
# Running this script again resumes from the checkpoint (checkpoint.resume: auto). The
# supervisor (zerotune.launcher.agent) passes the signals on to the training processes and
# kills them if they have not stopped {{grace}} s later (the planner's save-time estimate).
set -uo pipefail

RUN_DIR={{run_dir}}
WORKDIR={{workdir}}
PYTHON={{python}}
cd "$WORKDIR" || exit 1

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-{{omp_threads}}}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed collective aborts instead of hanging
export NCCL_ASYNC_ERROR_HANDLING=1         # the same, for older torch
{{env_lines}}

exec "$PYTHON" -m zerotune.launcher.agent --grace {{grace}} {{torchrun_args}} -m zerotune.training "$RUN_DIR"
