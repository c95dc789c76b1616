"""model/: the model a recipe asks for, and what it computes.

    build.py          HF weights, dtype, attention kernel, gradient checkpointing, compile, the method
    adapters.py       bottleneck adapters (zerotune's own; the others come from HF peft)
    moe.py            mixtures of experts: ZeRO-3 leaf modules, the router's aux loss on
    loss.py           the chunked linear cross-entropy (the full logits are never held)
    fp8.py            train.precision: the decoder's linears in FP8 (torchao float8), chosen per rank
    fp8_frozen.py     the FP8 linear of a frozen (LoRA base) weight: cast once, no weight-gradient GEMM
    long_sequence.py  tiled MLP and checkpointed activations offloaded to CPU (per-layer changes
                      build_model applies; sequence parallelism is in long_context/)
    generate.py       `zerotune generate` from a run, a checkpoint or an export
    samples.py        greedy completions of the recipe's eval prompts during training

model/ imports data/ (chat templates for prompts) and core; never run/, checkpoint/ or export/.
"""
