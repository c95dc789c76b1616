"""Peer baseline: what a user picks instead -- HF Trainer (+ DeepSpeed / PEFT / bitsandbytes).

A copy of ../shared/bench/peer_hf.py (the peer the project is compared with) so that it
travels with the checkout to the GPU machine, plus two additions that leave the original
random-token mode unchanged: a real-data mode (`--data`) and `--model-dir` (where the LoRA /
QLoRA modes keep the random-initialised model; default $PEER_MODEL_DIR, else /tmp/rand_<size>).
--plain, --compile and PEER_MODEL_DIR follow the shared copy (2026-12-04).

Measures steady-state tokens/s per GPU, MFU and peak GPU memory on random-token batches
(no padding), so the project can be compared with it on the same work.

  torchrun --nproc_per_node N benchmarks/peer_hf.py full  --size 1b --seq 2048 --mbs 8 [--offload]
  torchrun --nproc_per_node 1 benchmarks/peer_hf.py qlora --size 8b --seq 2048 --mbs 4
  ... --liger   # the informed user's setting: TrainingArguments(use_liger_kernel=True), needs liger-kernel
  ... full --plain   # one GPU without DeepSpeed: fp32 masters + bf16 autocast, torch fused AdamW (DDP on several)
  ... --compile      # TrainingArguments(torch_compile=True)
  PEER_MODEL_DIR=DIR # where lora/qlora keep (or find) the random model (--model-dir wins); default /tmp/rand_SIZE

Data mode: real chat rows rendered with the tokenizer's chat template, truncated to --max-len,
each batch padded to its longest sample by transformers' DataCollatorForSeq2Seq (labels -100
on padding; every real token trains, as a plain HF user sets labels = input_ids), and
tokens/s counting only the real (non-padding) tokens:

  torchrun --nproc_per_node 1 benchmarks/peer_hf.py full --size 1b --mbs 8 \\
      --data examples/data/alpaca/alpaca_en_demo.json --format alpaca \\
      --tokenizer examples/tokenizers/phi-3-mini --max-len 2048

The RESULT line then gains real_tok_s_gpu (real tokens of this rank over the timed steps /
their total time), real_tok_s_gpu_median (the median of the per-step ratio), padded_tok_s_gpu
and pad_fraction; tok_s_gpu and mfu are the real-token figures. MFU uses as sequence length
the token-weighted mean sample length (sum n^2 / sum n): the attention a real token does.
"""
import argparse, json, os, sys, time

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback,
                          TrainingArguments)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_setup import SIZES  # noqa: E402  one table of model shapes for every benchmark


def peak_flops() -> float:
    """Dense bf16 peak of this GPU from zerotune's table (core/flops.py), the MFU denominator both
    sides use; PEAK_TFLOPS overrides it; 989 (H100/H200 SXM) when neither knows the GPU."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    try:
        from zerotune.core.flops import peak_tflops_of
    except ImportError:   # the peer run alone, without zerotune on the path
        return 989e12
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return (peak_tflops_of(name) or 989.0) * 1e12


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


# ----------------------------------------------------------------------------- data mode
def read_rows(path):
    """A .json list or a .jsonl file of rows."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(row, fmt):
    """One alpaca / sharegpt row -> chat messages [{"role", "content"}]."""
    if fmt == "alpaca":
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        for q, a in row.get("history") or []:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if fmt == "sharegpt":
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return msgs + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
    raise ValueError(f"unknown format {fmt!r}")


class ChatRows(torch.utils.data.Dataset):
    """Rows rendered with the tokenizer's chat template, tokenized, truncated to max_len;
    labels = input_ids (the collator pads them with -100)."""

    def __init__(self, path, fmt, tokenizer, max_len):
        self.rows = []
        for row in read_rows(path):
            text = tokenizer.apply_chat_template(to_messages(row, fmt), tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
            self.rows.append(list(ids))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"  # training pads on the right (phi-3's tokenizer_config says left, for generation)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def collator(tokenizer):
    """Pads each batch to its longest sample; labels -100 on padding."""
    from transformers import DataCollatorForSeq2Seq
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")


class Counter:
    """Tokens of the batches of the current optimizer step (counted on the host, before they
    move to the GPU: no extra synchronisation)."""

    def __init__(self):
        self.real = self.padded = self.sq = 0

    def add(self, inputs):
        mask = inputs.get("attention_mask")
        if mask is None:
            n = inputs["input_ids"].numel()
            self.real += n
            self.sq += n * inputs["input_ids"].shape[-1]
        else:
            lens = mask.sum(-1)
            self.real += int(lens.sum())
            self.sq += int((lens * lens).sum())
        self.padded += inputs["input_ids"].numel()


class CountingTrainer(Trainer):
    counter = None

    def training_step(self, model, inputs, *args, **kwargs):
        if self.counter is not None:
            self.counter.add(inputs)
        return super().training_step(model, inputs, *args, **kwargs)


class Clock(TrainerCallback):
    def __init__(self, warmup, counter=None):
        self.warmup, self.times = warmup, []
        self.counter, self.tokens = counter, []  # tokens: (real, padded, sum of squared sample lengths) per timed step

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        if self.counter is not None:
            self.counter.__init__()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)
            if self.counter is not None:
                self.tokens.append((self.counter.real, self.counter.padded, self.counter.sq))


def count_params(c):
    d, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = 2 * d * d + 2 * d * kv + 3 * d * c.intermediate_size + 2 * d
    return c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * layer + d


def flops_per_token(cfg, n_params, seq):
    # 6N over the matmul weights (the input embedding lookup does no FLOPs) + causal attention
    # (12 * L * d * s, halved for causality); recomputation is not counted (model FLOPs, not hardware FLOPs)
    n = n_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return 6 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["full", "qlora", "lora"])
    p.add_argument("--size", default="1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--no-gc", action="store_true")
    p.add_argument("--liger", action="store_true", help="HF Trainer's use_liger_kernel=True (fused RMSNorm, RoPE, SwiGLU, linear+CE)")
    p.add_argument("--plain", action="store_true", help="full mode without DeepSpeed: torch fused AdamW (DDP on several GPUs)")
    p.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    p.add_argument("--model-dir", default=None, help="lora/qlora: the random model's folder (made once; default /tmp/rand_SIZE)")
    p.add_argument("--data", default=None, help="real data mode: a .json/.jsonl file of chat rows (else random tokens)")
    p.add_argument("--format", choices=["alpaca", "sharegpt"], default="alpaca", help="row format of --data")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder whose chat template renders --data")
    p.add_argument("--max-len", type=int, default=2048, help="data mode: samples are truncated to this many tokens")
    a = p.parse_args()
    if a.data and not a.tokenizer:
        p.error("--data needs --tokenizer")
    return a


def full_model(a, cfg, common):
    """ZeRO-3 (optionally offloaded) full fine-tune, as the HF Trainer + DeepSpeed docs set it up."""
    ds = {"bf16": {"enabled": True},
          "zero_optimization": {"stage": a.zero, "overlap_comm": True, "contiguous_gradients": True,
                                "stage3_gather_16bit_weights_on_model_save": True},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}},
          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": 1.0}
    if a.offload:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    if a.plain:
        args = TrainingArguments(optim="adamw_torch_fused", max_grad_norm=1.0, **common)
        with torch.device("cuda"):  # fp32 master weights + bf16 autocast, as DeepSpeed keeps fp32 masters
            return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), args
    args = TrainingArguments(deepspeed=ds, **common)  # must exist before from_config for zero.Init
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16), args


def saved_random_model(a, cfg) -> str:
    path = a.model_dir or os.environ.get("PEER_MODEL_DIR", f"/tmp/rand_{a.size}")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not os.path.exists(path + "/.done"):
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(path)
        open(path + "/.done", "w").close()  # the other local ranks wait for this, not for a half-written folder
        del m
        torch.cuda.empty_cache()
    while not os.path.exists(path + "/.done"):
        time.sleep(2)
    return path


def adapter_model(a, path, common):
    """LoRA r16 all-linear on a bf16 base, or QLoRA on an NF4 double-quantised base."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig
    q = None
    if a.mode == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q,
                                                 device_map={"": int(os.environ.get("LOCAL_RANK", 0))},
                                                 attn_implementation="sdpa")
    if q is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not a.no_gc)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(optim="paged_adamw_8bit" if q is not None else "adamw_torch_fused", **common)
    return model, args


def make_trainer(a, model, args, cfg, world):
    if not a.data:
        clock = Clock(a.warmup)
        data = RandomTokens(a.mbs * world * (a.steps + 2), a.seq, cfg.vocab_size)
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[clock]), clock, data
    tok = load_tokenizer(a.tokenizer)
    data = ChatRows(a.data, a.format, tok, a.max_len)
    counter = Counter()
    clock = Clock(a.warmup, counter)
    tr = CountingTrainer(model=model, args=args, train_dataset=data, callbacks=[clock], data_collator=collator(tok))
    tr.counter = counter
    return tr, clock, data


def data_mode_figures(a, clock, cfg, n_params, data) -> tuple[float, float, dict]:
    """Real-data mode: tokens/s counts only real (non-padding) tokens."""
    real = sum(t[0] for t in clock.tokens)
    padded = sum(t[1] for t in clock.tokens)
    seq_eff = sum(t[2] for t in clock.tokens) / max(real, 1)  # token-weighted mean sample length
    tok_s_gpu = real / sum(clock.times)
    mfu = tok_s_gpu * flops_per_token(cfg, n_params, seq_eff) / peak_flops()
    per_step = sorted(t[0] / s for t, s in zip(clock.tokens, clock.times))
    extra = dict(data=a.data, format=a.format, max_len=a.max_len, samples=len(data),
                 real_tok_s_gpu=round(tok_s_gpu), real_tok_s_gpu_median=round(per_step[len(per_step) // 2]),
                 padded_tok_s_gpu=round(padded / sum(clock.times)), pad_fraction=round(1 - real / max(padded, 1), 4),
                 mean_sample_len=round(seq_eff, 1), timed_steps=len(clock.times))
    return tok_s_gpu, mfu, extra


def main():
    a = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = LlamaConfig(**SIZES[a.size], max_position_embeddings=max(4096, a.seq), rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    common = dict(output_dir="/tmp/peer_out", per_device_train_batch_size=a.mbs, max_steps=a.steps,
                  learning_rate=1e-5, bf16=True, gradient_checkpointing=not a.no_gc,
                  gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1000,
                  save_strategy="no", report_to=[], dataloader_num_workers=2, disable_tqdm=True,
                  use_liger_kernel=a.liger, torch_compile=a.compile)
    t_load = time.perf_counter()
    if a.mode == "full":
        model, args = full_model(a, cfg, common)
    else:
        path = saved_random_model(a, cfg)
        t_load = time.perf_counter()
        model, args = adapter_model(a, path, common)
    load_s = time.perf_counter() - t_load
    n_params = count_params(cfg)
    tr, clock, data = make_trainer(a, model, args, cfg, world)
    torch.cuda.reset_peak_memory_stats()
    tr.train()
    step = sorted(clock.times)[len(clock.times) // 2]
    tok_s_gpu = a.mbs * a.seq / step
    mfu = tok_s_gpu * flops_per_token(cfg, n_params, a.seq) / peak_flops()
    extra = {}
    if a.data:
        tok_s_gpu, mfu, extra = data_mode_figures(a, clock, cfg, n_params, data)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(dict(peer="hf-trainer", mode=a.mode, size=a.size, params=n_params,
                                          seq=a.max_len if a.data else a.seq,
                                          mbs=a.mbs, world=world, zero=a.zero if a.mode == "full" else None,
                                          offload=a.offload, gc=not a.no_gc, liger=a.liger, plain=a.plain,
                                          compile=a.compile, step_s=round(step, 4),
                                          tok_s_gpu=round(tok_s_gpu), mfu=round(mfu, 4), load_s=round(load_s, 1),
                                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                          device=torch.cuda.get_device_name(), **extra)), flush=True)


if __name__ == "__main__":
    main()
