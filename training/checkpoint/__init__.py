"""checkpoint/: saving, verifying, resuming and resharding checkpoints.

    save.py        a checkpoint of every rank (shards, RNG, loop state, MANIFEST, COMPLETE last); retention
    async_save.py  the background writer: a save snapshots to CPU and writes while training goes on
    manifest.py    MANIFEST.json: every file's size (and crc32 of the small ones); verify before resume
    disk_space.py  a full disk during a save -> one line; the partial folder never counts
    resume.py      which checkpoint to resume, and loading it (RNG, data position) on this run's GPU count
    reshard.py     a ZeRO checkpoint of another GPU count -> DeepSpeed's universal layout, once
    safe_load.py   the one way checkpoint files are read: weights_only with DeepSpeed's plain types (our
                   reads; DeepSpeed's own torch.load calls only inside safe_loads_in, never process-wide)

checkpoint/ imports core and nothing else of training/ (not run/, export/ or model/): the loop
calls it, export reads through safe_load.
"""
