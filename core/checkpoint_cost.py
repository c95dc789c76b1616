"""What a checkpoint costs, for the planner and the launcher (torch-free): its bytes, the
seconds a save takes (the grace a stop signal needs) and, with checkpoint.async_save, the host
memory its snapshot holds while the background thread writes it (training/checkpoint/async_save.py).

Bytes: the trainable parameters in working precision plus the optimizer's fp32 master copy
(not for fp32 training) and the AdamW moments (8 bytes; 2 for 8-bit optimizers).
"""
from __future__ import annotations

from .memory import Strategy, Workload, dtype_bytes, estimate_memory

WRITE_BYTES_PER_S = 2 ** 30   # per node, assumed (one H200 node measured 1.3-2.2 GB/s)
SAVE_OVERHEAD_S = 10.0        # barriers, small files and fsyncs, whatever the size


def checkpoint_bytes(w: Workload, st: Strategy) -> float:
    trainable = estimate_memory(w, st)["trainable"]
    optimizer = (0 if w.dtype == "fp32" else 4) + (2 if w.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8)
    return trainable * (dtype_bytes(w.dtype) + optimizer)


def save_seconds(w: Workload, st: Strategy, bytes_per_s: float = WRITE_BYTES_PER_S) -> float:
    """Seconds to write one checkpoint (launcher/submit.py grace_seconds, job.sbatch's --signal
    lead time): its bytes split over the nodes at bytes_per_s per node, plus SAVE_OVERHEAD_S for
    the barriers, small files and fsyncs. An 8B full fine-tune (~112 GB) comes to ~114 s; one H200
    node measured 50-87 s, so the estimate errs long, as a grace should."""
    return SAVE_OVERHEAD_S + checkpoint_bytes(w, st) / max(1, w.nodes) / bytes_per_s


def snapshot_bytes_per_node(w: Workload, st: Strategy) -> float:
    """Host memory of one node's CPU copy of its ranks' checkpoint parts while a background save
    writes them: the checkpoint split over the nodes; below ZeRO-3, rank 0 also copies the whole
    module's weights (DeepSpeed's model_states file)."""
    total = checkpoint_bytes(w, st) / max(1, w.nodes)
    if st.zero < 3:
        total += estimate_memory(w, st)["trainable"] * dtype_bytes(w.dtype)
    return total
