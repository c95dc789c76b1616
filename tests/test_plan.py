"""The planner: parameter counts against real models, the ZeRO paper's 2/2/12 bytes-per-parameter
split, the activation/logits formula, the calibration against the peer's measured peaks, and
`zerotune plan` / `distributed.zero: auto` end to end."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import base_recipe, write_recipe, zerotune
from zerotune.launcher import plan as P
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe
from zerotune.core.flops import flops_per_token, num_params
from zerotune.core.io import parse_size

GIB = 2 ** 30
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
LLAMA_3B = dict(LLAMA_1B, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24)
LLAMA_8B = dict(LLAMA_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                tie_word_embeddings=False)
SMALL = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


@pytest.mark.parametrize("cfg", [
    SMALL,
    dict(SMALL, tie_word_embeddings=True),
    dict(SMALL, model_type="qwen2", num_key_value_heads=4),      # q/k/v biases
    dict(SMALL, model_type="mistral", head_dim=48),               # head_dim != hidden / heads
], ids=["llama", "tied", "qwen2", "head_dim"])
def test_num_params_matches_the_real_model(cfg):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert num_params(config.to_dict()) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand():
    # 1B: tied, so the LM head (V d) counts once and the embedding lookup not at all
    d, L, V, ff, kv, s = 2048, 16, 128256, 8192, 512, 2048
    layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    n = V * d + L * layer + d
    assert num_params(LLAMA_1B) == n == 1_235_814_400
    assert flops_per_token(LLAMA_1B, s) == 6 * n + 6 * L * d * s
    # 8B untied: the input embedding is not a matmul
    assert flops_per_token(LLAMA_8B, s) == 6 * (num_params(LLAMA_8B) - 128256 * 4096) + 6 * 32 * 4096 * s


def test_lora_flops_count_what_runs():
    """Frozen base: forward 2N + activation gradients 2N, no weight gradients; adapters 6 each;
    attention unchanged. LoRA r16 all-linear on 8B: ~2/3 of the full fine-tune's FLOPs."""
    d, L, s = 4096, 32, 2048
    n = num_params(LLAMA_8B) - 128256 * d
    from zerotune.core.memory import lora_params
    adapters = lora_params(P.Workload(model=LLAMA_8B, lora_r=16))
    assert adapters == L * 16 * (2 * d + 2 * (d + 1024) + 2 * d + 3 * (d + 14336))
    lora = flops_per_token(LLAMA_8B, s, frozen_base=True, trainable=adapters)
    assert lora == 4 * n + 6 * adapters + 6 * L * d * s
    assert 0.66 < lora / flops_per_token(LLAMA_8B, s) < 0.70


def mem(cfg, st, **kw):
    w = P.Workload(model=cfg, **{"micro_batch_size": 1, "seq_len": 1024, **kw})
    return w, P.estimate_memory(w, st)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_paper_bytes_per_parameter(stage):
    """bf16 mixed precision: 2 bytes params, 2 bytes grads, 12 bytes Adam (fp32 master, m, v);
    stage 1 shards the 12, stage 2 also the grads, stage 3 also the params."""
    n, W = num_params(LLAMA_1B), 8
    _, m = mem(LLAMA_1B, P.Strategy("full", stage), gpus_per_node=W)
    assert m["optimizer"] == pytest.approx(12 * n / W)
    assert m["grads"] == pytest.approx(2 * n / W if stage >= 2 else 2 * n)
    assert m["params"] == pytest.approx(2 * n / W if stage == 3 else 2 * n)
    # 7.5B on 64 GPUs, the paper's Figure 1: 120 GB -> 31.4 / 16.6 / 1.9 GB
    n75 = 7.5e9
    paper = {1: 4 * n75 + 12 * n75 / 64, 2: 2 * n75 + 14 * n75 / 64, 3: 16 * n75 / 64}[stage]
    assert paper / 1e9 == pytest.approx({1: 31.4, 2: 16.6, 3: 1.875}[stage], abs=0.05)


def test_offload_moves_states_to_cpu():
    n, W = num_params(LLAMA_1B), 4
    _, m = mem(LLAMA_1B, P.Strategy("full", 3, True, True), gpus_per_node=W)
    assert m["params"] == m["grads"] == m["optimizer"] == 0
    # fp32 master + m + v + fp32 gradient partition, plus the bf16 parameters, for the 4 GPUs of the node
    assert m["cpu_per_node"] == pytest.approx((12 + 4 + 2) * n / W * W)
    _, fp32 = mem(LLAMA_1B, P.Strategy("full", 1), dtype="fp32")
    assert fp32["params"] == 4 * n and fp32["grads"] == 4 * n and fp32["optimizer"] == 8 * n


def test_activation_and_logits_formula_by_hand():
    B, S = 2, 1024
    d, L, V, ff, kv = 2048, 16, 128256, 8192, 512
    n = num_params(LLAMA_1B)
    _, on = mem(LLAMA_1B, P.Strategy("full", 1), micro_batch_size=B, seq_len=S)
    saved = (11 * d + 4 * ff + 2 * kv) * 2 * B * S       # one layer's saved tensors
    working = saved + (4 * d + 2 * kv) * 2 * B * S       # recomputed, with its backward's own gradients
    kept = L * d * 2 * B * S
    logits = 12 * B * S * V
    assert on["activations"] == kept + working
    assert on["logits"] == logits
    buckets = 2 * d * d * 2
    assert on["total"] == pytest.approx(16 * n + buckets + kept + max(logits, working))
    _, off = mem(LLAMA_1B, P.Strategy("full", 1, grad_ckpt=False), micro_batch_size=B, seq_len=S)
    assert off["activations"] == L * saved
    assert off["total"] == pytest.approx(16 * n + buckets + L * saved + logits)


def test_qlora_breakdown_by_hand():
    """Llama-3-8B QLoRA r16 all-linear, NF4 + double quant, paged AdamW 8-bit, mbs 4 x 2048:
    zerotune's path (bf16 after DeepSpeed's cast) and the HF Trainer peer's (fp32 upcast)."""
    B, S = 4, 2048
    d, L, V, ff, kv = 4096, 32, 128256, 14336, 1024
    n = num_params(LLAMA_8B)
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * ff)
    assert linear == 6_979_321_856 and n - linear == 2 * V * d + (2 * L + 1) * d == 1_050_939_392
    nf4 = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8          # 4-bit + 8-bit absmax/64 + fp32 per 256 blocks
    lora = L * 16 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + ff))
    assert lora == 41_943_040
    adapted_inputs = 6 * d + ff                                # q k v o gate up take d, down takes ff
    dequant = 2 * d * ff                                       # the largest linear in bf16
    logits, buckets = 12 * B * S * V, 2 * d * d * 2
    w, z = mem(LLAMA_8B, P.Strategy("qlora", 0), micro_batch_size=B, seq_len=S, optimizer="paged_adamw_8bit")
    assert z["trainable"] == lora
    assert z["params"] == pytest.approx(nf4 + 2 * (n - linear) + 2 * lora)     # bf16 rest and adapters
    assert z["grads"] == 2 * lora and z["optimizer"] == (4 + 2) * lora         # fp32 master + 8-bit m, v
    kept = L * d * 2 * B * S
    # a layer's tensors (frozen norms: 2 d less), each adapted linear's dropout output + mask and its
    # r-wide lora_A output, less the inputs only the linears kept (both norms' outputs, act(gate) * up)
    # and the recomputed layer's backward its own gradients (4 d + 2 kv)
    working = (2 * (11 * d + 4 * ff + 2 * kv - 2 * d + 7 * 16 - (2 * d + ff) + 4 * d + 2 * kv)
               + adapted_inputs * (2 + 1)) * B * S + dequant
    assert z["activations"] == pytest.approx(kept + working)
    assert z["total"] == pytest.approx(z["params"] + 8 * lora + buckets + kept + max(logits, working))
    assert z["total"] / GIB == pytest.approx(19.51, abs=0.01)   # measured: 19.52 GiB
    _, peer = mem(LLAMA_8B, P.Strategy("qlora", 0), micro_batch_size=B, seq_len=S, optimizer="paged_adamw_8bit",
                  trainer="hf-trainer")
    assert peer["params"] == pytest.approx(nf4 + 4 * (n - linear) + 4 * lora)  # fp32 rest and adapters
    assert peer["grads"] == 4 * lora and peer["optimizer"] == 2 * lora
    kept32 = L * d * 4 * B * S                                                 # fp32 residual stream
    working32 = (4 * (11 * d + 4 * ff + 2 * kv - 2 * d + 7 * 16 - (2 * d + ff) + 4 * d + 2 * kv)
                 + adapted_inputs * (4 + 1)) * B * S + dequant
    assert peer["total"] == pytest.approx(peer["params"] + 6 * lora + buckets + kept32 + max(logits, working32))
    # LoRA: the adapters' 16 bytes split differently on the two paths, the total is the same
    _, lz = mem(LLAMA_8B, P.Strategy("lora", 0), micro_batch_size=B, seq_len=S)
    _, lp = mem(LLAMA_8B, P.Strategy("lora", 0), micro_batch_size=B, seq_len=S, trainer="hf-trainer")
    assert (lz["grads"], lz["optimizer"]) == (2 * lora, 12 * lora)
    assert (lp["grads"], lp["optimizer"]) == (4 * lora, 8 * lora)
    assert lz["total"] == pytest.approx(lp["total"]) == pytest.approx(2 * n + 16 * lora + buckets + kept + logits)


# peak GiB measured on one H100: (zerotune's path, benchmarks/measure_memory.py, 2026-11-25) and
# the HF Trainer peer (benchmarks/peer_hf.py, 2026-11-24); both tabled in docs/plan_vs_measured.md
MEASURED = [
    (LLAMA_1B, 8, P.Strategy("full", 3), "adamw", "zerotune", 43.22),
    (LLAMA_1B, 8, P.Strategy("full", 3, True, True), "adamw", "zerotune", 26.69),
    (LLAMA_8B, 4, P.Strategy("lora", 0), "adamw", "zerotune", 29.44),
    (LLAMA_8B, 4, P.Strategy("qlora", 0), "paged_adamw_8bit", "zerotune", 19.52),
    (LLAMA_1B, 8, P.Strategy("full", 3), "adamw", "hf-trainer", 44.1),
    (LLAMA_1B, 8, P.Strategy("full", 3, True, True), "adamw", "hf-trainer", 27.6),
    (LLAMA_3B, 4, P.Strategy("full", 3), "adamw", "hf-trainer", 62.1),
    (LLAMA_8B, 4, P.Strategy("lora", 0), "adamw", "hf-trainer", 29.4),
    (LLAMA_8B, 4, P.Strategy("qlora", 0), "paged_adamw_8bit", "hf-trainer", 24.4),
]


@pytest.mark.parametrize("cfg,mbs,st,opt,trainer,measured", MEASURED, ids=[
    "1b-z3", "1b-offload", "8b-lora", "8b-qlora", "peer-1b-z3", "peer-1b-offload", "peer-3b-z3", "peer-8b-lora",
    "peer-8b-qlora"])
def test_estimate_within_15_percent_of_measured_peak(cfg, mbs, st, opt, trainer, measured):
    _, m = mem(cfg, st, micro_batch_size=mbs, seq_len=2048, optimizer=opt, trainer=trainer)
    assert abs(m["total"] / GIB - measured) / measured < 0.15, (m["total"] / GIB, measured)


def test_choice_fastest_that_fits():
    # 8B full fine-tune on one 80 GB GPU: 16 bytes x 8B = 128 GB, only optimizer offload fits
    w = P.Workload(model=LLAMA_8B, micro_batch_size=1, seq_len=2048)
    rows = P.plan(w, "full")
    best = P.recommend(rows, "full", grad_ckpt=True)
    assert best.strategy.offload_optimizer and best.total < 78 * GIB
    assert not any(r.fits for r in rows if r.strategy.method == "full" and not r.strategy.offload_optimizer)
    # 1B on 8 GPUs: everything fits; ZeRO-3 pays for its extra communication
    w8 = P.Workload(model=LLAMA_1B, micro_batch_size=4, seq_len=2048, gpus_per_node=8)
    best8 = P.recommend(P.plan(w8, "full"), "full", grad_ckpt=True)
    assert best8.strategy.zero in (0, 1, 2) and not best8.strategy.offload_optimizer
    # a CPU too small for the offloaded states
    tight = P.plan(w, "full", cpu_memory=64 * GIB)
    assert P.recommend(tight, "full", grad_ckpt=True) is None


def test_time_and_cost_from_tokens():
    w = P.Workload(model=LLAMA_1B, micro_batch_size=8, seq_len=2048, gpus_per_node=1, train_tokens=1e9)
    r = next(r for r in P.plan(w, "full", price=2.5) if r.strategy == P.Strategy("full", 3))
    tps = 0.265 * 989e12 / flops_per_token(LLAMA_1B, 2048)   # core/memory.py MEASURED, ZeRO-3
    assert r.tokens_per_s == pytest.approx(tps)
    assert r.hours == pytest.approx(1e9 / tps / 3600)
    assert r.cost == pytest.approx(r.gpu_hours * 2.5)


def test_parse_size():
    assert parse_size("80GB") == 80 * GIB == parse_size("80 GiB") == parse_size("80g")
    assert parse_size("1.5T") == 1.5 * 2 ** 40
    with pytest.raises(RecipeError, match="not a memory size"):
        parse_size("lots")


def test_plan_command(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    out = zerotune("plan", str(recipe), "--gpus", "2", "--price", "2.5").stdout
    assert "full ZeRO-3 +offload opt+params, ckpt on" in out and "QLoRA ZeRO-0" in out
    assert "recommended: full ZeRO-" in out and "4 steps x 8 samples" in out
    # the save estimate that sets a Slurm job's stop-signal lead time (launcher/submit.py grace_seconds)
    assert out.strip().splitlines()[-1].startswith("checkpoint: ~0.0 GiB a save, ~10 s to write (assumed: 1 GiB/s "
                                                   "per node plus 10 s of barriers and fsyncs)")
    assert "a Slurm job gets its stop signal 70 s before its time limit" in out
    data = json.loads(zerotune("plan", str(recipe), "--json").stdout)
    assert data["recommended"] and all(r["fits"] for r in data["rows"])


def test_plan_names_what_does_not_fit(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    proc = zerotune("plan", str(recipe), "--gpu-memory", "2.6GB", "--set", "train.micro_batch_size=512", check=False)
    assert proc.returncode == 1 and "NO" in proc.stdout and "recommended: nothing fits" in proc.stdout


def test_zero_auto_resolves_to_the_plan_choice(tmp_path):
    from zerotune.launcher.prepare import resolve
    r = validate_recipe(base_recipe(tmp_path, distributed={"zero": "auto"}))
    for world in (1, 4):  # ZeRO-3 is no faster on one GPU and slower on several
        d = resolve(r, world_size=world).distributed
        assert d.zero in (0, 1, 2) and not d.offload_optimizer and not d.offload_params
    off = validate_recipe(base_recipe(tmp_path, distributed={"zero": "auto", "offload_optimizer": True}))
    assert resolve(off, world_size=2).distributed.offload_optimizer is True
    big = validate_recipe(base_recipe(tmp_path, distributed={"zero": "auto"}, train={"max_steps": 1, "micro_batch_size": 100000}))
    with pytest.raises(RecipeError, match="no strategy fits"):
        resolve(big, world_size=1)


def test_launch_writes_the_auto_choice(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, distributed={"zero": "auto"}))
    zerotune("launch", str(recipe), "--dry-run", "--nproc", "2")
    saved = yaml.safe_load((tmp_path / "runs" / "t" / "recipe.yaml").read_text())
    assert saved["distributed"]["zero"] in (0, 1, 2)
    assert json.loads((tmp_path / "runs" / "t" / "ds_config.json").read_text())["zero_optimization"]["stage"] == \
        saved["distributed"]["zero"]


def test_plan_says_why_a_strategy_does_not_fit(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    out = zerotune("plan", str(recipe), "--gpu-memory", "2.6GB", "--set", "train.micro_batch_size=512",
                   check=False).stdout
    why = out.split("\nwhy NO:\n")[1].split("\n\n")[0].splitlines()
    rows = [ln for ln in out.splitlines() if ln.startswith(("full ", "LoRA ", "QLoRA ")) and " NO " in ln]
    assert len(why) == len(rows) == 16
    # each row as small as the planner can make it: every layer checkpointed, inputs on the host, MLP tiled
    assert why[0] == "  full ZeRO-0, ckpt on +offload 5 act +tiled MLP                      needs 0.4 GiB per GPU, 0.1 usable"
    assert why[-1] == "  QLoRA ZeRO-0, ckpt on +offload 5 act +tiled MLP                     needs 0.4 GiB per GPU, 0.1 usable"
    assert "why NO:" not in zerotune("plan", str(recipe)).stdout   # everything fits: no section


def test_fp8_lora_base_counts_its_kept_fp8_copy():
    """train.precision fp8 on a LoRA base (training/model/fp8_frozen.py) keeps every frozen decoder
    linear's weight in FP8 beside the bf16 one: 1 byte a weight, 6.98e9 bytes for Llama 3 8B
    (32 x (2 x 4096^2 + 2 x 4096 x 1024 + 3 x 4096 x 14336)), plus the largest (down/gate/up,
    58.7e6) transposed during its backward. Full and QLoRA never keep one; the HF peer never runs FP8."""
    st = P.Strategy("lora", 0, grad_ckpt=True)
    bf16 = P.estimate_memory(P.Workload(model=LLAMA_8B, micro_batch_size=4), st)
    fp8 = P.estimate_memory(P.Workload(model=LLAMA_8B, micro_batch_size=4, fp8_base=True), st)
    assert fp8["params"] - bf16["params"] == 32 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) == 6_979_321_856
    assert fp8["temporary"] - bf16["temporary"] == 4096 * 14336
    assert fp8["total"] - bf16["total"] == 6_979_321_856 + 4096 * 14336
