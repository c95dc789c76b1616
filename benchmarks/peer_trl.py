"""Peer: TRL's SFTTrainer (trl 1.16), as an informed user runs it on chat data.

The same work as benchmarks/peer_hf.py's data mode (a random-initialised Llama-3 shape, real
chat rows rendered with the tokenizer's chat template, truncated to --max-len, bf16, SDPA), the
way TRL's docs set it up: rows as conversational prompt-completion pairs (the last assistant turn
is the completion), so SFTTrainer trains on the response only (completion_only_loss), LoRA
through SFTTrainer's peft_config, and its speed settings:

  --packing        SFTConfig(packing=True, packing_strategy="bfd"): best-fit-decreasing rows of
                   --max-len tokens, padding-free (flattened, position_ids restart per sample)
  --padding-free   SFTConfig(padding_free=True) without packing: each batch of --mbs samples
                   flattened into one sequence, no padding
  --liger          SFTConfig(use_liger_kernel=True) (fused RMSNorm, RoPE, SwiGLU, linear + CE; CUDA)
  --no-gc          gradient_checkpointing=False (SFTConfig's default is True)

  torchrun --nproc_per_node 1 benchmarks/peer_trl.py lora --size 8b --mbs 4 --model-dir DIR \\
      --data examples/data/alpaca/alpaca_en_demo.json --format alpaca \\
      --tokenizer examples/tokenizers/phi-3-mini --max-len 2048 --packing --liger --no-gc

Prints one line `RESULT {json}` of peer_hf.py's shape (peer "trl-sft"): tokens/s per GPU counting
only real (non-padding) tokens over the timed steps, MFU (6N + causal attention at the
token-weighted mean sample length, peer_hf.py's formula), peak GPU memory (None on CPU), plus
real_tok_s_gpu, padded_tok_s_gpu, pad_fraction, packing, padding_free. Runs on CPU too (fp32,
no Liger): tests/test_bench.py's smoke test.
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_hf import count_params, data_mode_figures, load_tokenizer, read_rows, to_messages  # noqa: E402

CUDA = torch.cuda.is_available()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def prompt_completion(row, fmt):
    """One row -> TRL's conversational prompt-completion pair: the last assistant turn trains."""
    msgs = to_messages(row, fmt)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {"prompt": msgs[:last], "completion": [msgs[last]]}


def sample_lengths(inputs) -> list:
    """Real tokens of each sample of a collated batch: the attention mask's rows when padded, else
    the runs of position_ids (padding-free batches: one flattened row, positions restart at 0)."""
    if inputs.get("attention_mask") is not None:
        return inputs["attention_mask"].sum(-1).tolist()
    pos = inputs.get("position_ids")
    if pos is None:
        ids = inputs["input_ids"]
        return [ids.shape[-1]] * ids.shape[0]
    pos = pos.reshape(-1)
    starts = (pos == 0).nonzero().reshape(-1).tolist() + [pos.numel()]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


class Counter:
    """Tokens of the current optimizer step's batches (host side): real, padded, sum of squares."""

    def __init__(self):
        self.real = self.padded = self.sq = 0

    def add(self, inputs):
        lens = sample_lengths(inputs)
        self.real += int(sum(lens))
        self.sq += int(sum(n * n for n in lens))
        self.padded += inputs["input_ids"].numel()


class Clock(TrainerCallback):
    def __init__(self, warmup, counter):
        self.warmup, self.counter, self.times, self.tokens = warmup, counter, [], []

    def on_step_begin(self, args, state, control, **kw):
        sync()
        self.t0 = time.perf_counter()
        self.counter.__init__()

    def on_step_end(self, args, state, control, **kw):
        sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append((self.counter.real, self.counter.padded, self.counter.sq))


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["full", "lora", "qlora"])
    p.add_argument("--size", default="8b", help="recorded (the model is --model-dir's)")
    p.add_argument("--model-dir", required=True, help="the random-initialised model's folder (bench.py makes it)")
    p.add_argument("--data", required=True, help="a .json/.jsonl file of chat rows")
    p.add_argument("--format", choices=["alpaca", "sharegpt"], default="alpaca")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder whose chat template renders --data")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=4, help="rows (packed) or samples per micro-batch")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--padding-free", action="store_true")
    p.add_argument("--liger", action="store_true")
    p.add_argument("--no-gc", action="store_true")
    return p.parse_args()


def build(a):
    """(SFTTrainer, Clock, Counter, model config, load seconds)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if CUDA else torch.float32
    q = None
    if a.mode == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.perf_counter()
    device = {"": int(os.environ.get("LOCAL_RANK", 0))} if CUDA else None
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype, quantization_config=q, device_map=device,
                                                 attn_implementation="sdpa")
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(a.tokenizer)
    data = Dataset.from_list([prompt_completion(r, a.format) for r in read_rows(a.data)])
    peft = None if a.mode == "full" else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                     target_modules="all-linear", task_type="CAUSAL_LM")
    optim = "paged_adamw_8bit" if q is not None else ("adamw_torch_fused" if CUDA else "adamw_torch")
    args = SFTConfig(output_dir="/tmp/peer_trl_out", per_device_train_batch_size=a.mbs, max_steps=a.steps,
                     learning_rate=1e-5, bf16=CUDA, fp16=False, gradient_checkpointing=not a.no_gc,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1000, save_strategy="no",
                     report_to=[], dataloader_num_workers=2 if CUDA else 0, disable_tqdm=True,
                     use_liger_kernel=a.liger, optim=optim, max_length=a.max_len, packing=a.packing,
                     packing_strategy="bfd", padding_free=a.padding_free, completion_only_loss=True,
                     dataset_num_proc=None, use_cpu=not CUDA)
    counter = Counter()
    clock = Clock(a.warmup, counter)

    class CountingSFT(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            counter.add(inputs)
            return super().training_step(model, inputs, *rest, **kw)

    tr = CountingSFT(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                     callbacks=[clock])
    return tr, clock, model.config, load_s, len(data)


def main():
    a = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tr, clock, cfg, load_s, samples = build(a)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    tr.train()
    if not clock.times:
        raise SystemExit("peer_trl.py: no timed steps (--steps must exceed --warmup, and the data hold enough rows)")
    n_params = count_params(cfg)
    # real tokens/s, MFU and the padding figures exactly as peer_hf.py's data mode counts them
    tok_s_gpu, mfu, figures = data_mode_figures(a, clock, cfg, n_params, range(samples))
    step = sorted(clock.times)[len(clock.times) // 2]
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(dict(
            peer="trl-sft", mode=a.mode, size=a.size, params=n_params, seq=a.max_len, mbs=a.mbs, world=world,
            zero=None, offload=False, gc=not a.no_gc, liger=a.liger, plain=False, compile=False,
            step_s=round(step, 4), tok_s_gpu=round(tok_s_gpu), mfu=round(mfu, 4), load_s=round(load_s, 1),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
            device=torch.cuda.get_device_name() if CUDA else "cpu",
            packing=a.packing, padding_free=a.padding_free or a.packing, **figures)), flush=True)


if __name__ == "__main__":
    main()
