"""monitoring/: what a run reports: tokens/s, MFU, memory, phase times, to the console,
RUN_DIR/metrics.jsonl, TensorBoard, wandb and MLflow, and profiles.

    metrics.py        the loop's one reporting object (Metrics): a step's numbers -> every sink
    throughput.py     tokens/s (real tokens, padding excluded), model FLOPs per token, MFU
    timing.py         where a step's time goes (data, forward/backward, optimizer, save)
    console.py        the progress line, the eval line, the watchdog for a step that hangs
    trackers.py       the sinks: TensorBoard, wandb, MLflow
    tracker_setup.py  which trackers a recipe asks for, their run ids (kept across resumes), hparams
    profile.py        a torch.profiler window, summarised by category

monitoring/ imports core and nothing else of training/: it is handed numbers, never the
engine's internals.
"""
