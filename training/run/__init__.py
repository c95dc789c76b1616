"""run/: the training loop and one step, on every rank.

    loop.py         setup -> run_steps -> finish: the whole run, top to bottom (`train(run_dir)`)
    step.py         one optimizer step: forward/backward of each micro-batch, the step's counts, eval
    engine.py       the process group (each rank's GPU first) and the DeepSpeed engine + optimizer
    ds_ops.py       DeepSpeed's compiled ops, built once per machine before the ranks need them
    signals.py      SIGINT/SIGTERM/SIGUSR1 -> a stop agreed by all ranks at a step boundary
    diagnostics.py  non-finite losses, out-of-memory advice, the optimizer step's guards
    heartbeat.py    RUN_DIR/HEARTBEAT: this job is alive (read by `zerotune status`)
    saves.py        the loop's checkpoints: every checkpoint.every steps (waiting for a busy writer), the last
    faults.py       fault injection for tests (installed only when a ZEROTUNE_TEST_* variable is set)
    sync_counter.py a step's collectives and host syncs, counted for tests and benchmarks (ZEROTUNE_TEST_COUNT_SYNCS)

run/ is the top of training/: it may import every other room (data, model, long_context,
checkpoint, export, monitoring) and core; no other room imports run/.
"""
