"""export/: a run's checkpoint -> a Hugging Face folder (safetensors) or a PEFT adapter.

    write.py   `zerotune export` and the run's final/ folder: full models, adapters, merged adapters
    stream.py  the final export streamed shard by shard from the ZeRO-3 ranks (~1 shard on rank 0)
    folder.py  where an export may be written, its marker file, the tokenizer and configs beside it

export/ may import checkpoint/ (safe loading), model/ (building the model to save) and data/
(the chat template saved with the tokenizer), and core; never run/.
"""
