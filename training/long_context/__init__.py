"""long_context/: sequence parallelism (DeepSpeed Ulysses): N ranks share one sequence.

    sequence_parallel.py  the groups, the model's wrapping, each rank's slice of a batch, the loss
    sp_attention.py       the all-to-all around attention (all tokens of H/N heads on each rank)

The per-layer options for long sequences (tiled MLP, offloaded activations) are model changes
and live in model/long_sequence.py. long_context/ imports model/ (the loss), data/ and core;
never run/, checkpoint/ or export/.
"""
