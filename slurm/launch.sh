#!/bin/bash
# shellcheck disable=SC2016  # recipe values are single-quoted on purpose: nothing in them expands
# zerotune torchrun launch for run {{name}}, written by `zerotune launch` from slurm/launch.sh.
# {{mode_comment}}
# `kill -USR1 <pid of this script>` asks the training to save a checkpoint and exit
# ({{requeue_code}}); running this script again resumes from it (checkpoint.resume: auto).
set -uo pipefail

RUN_DIR={{run_dir}}
WORKDIR={{workdir}}
PYTHON={{python}}
REQUEUE_EXIT_CODE={{requeue_code}}
cd "$WORKDIR" || exit 1

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-{{omp_threads}}}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed collective aborts instead of hanging
export NCCL_ASYNC_ERROR_HANDLING=1         # the same, for older torch
{{env_lines}}

started=$(date +%s)
# torchrun ignores USR1; the handler below passes it on to the training processes only.
(trap '' USR1; exec "$PYTHON" -m torch.distributed.run {{torchrun_args}} -m zerotune.training "$RUN_DIR") &
pid=$!
trap 'pkill -USR1 -P "$pid"' USR1
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
while :; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
marker=$(stat -c %Y "$RUN_DIR/PREEMPTED" 2>/dev/null || echo 0)
if [ "$rc" -ne 0 ] && [ "$marker" -ge "$started" ]; then
  echo "zerotune: checkpoint saved after a stop request; run this script again to resume"
  exit "$REQUEUE_EXIT_CODE"
fi
exit "$rc"
