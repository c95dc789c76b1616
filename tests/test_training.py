"""End to end through `zerotune train` with real DeepSpeed ZeRO-3 engines and torchrun.

The loss is averaged over the target tokens of the whole global batch, so micro-batch size,
accumulation and world size do not change it (nor the update): 4x1 == 1x4 == 2 ranks x 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import train_losses, base_recipe, write_recipe, zerotune

pytestmark = pytest.mark.slow


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "final" / "model.safetensors"))


def initial_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from conftest import STORIES
    return load_file(str(STORIES / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of the same 3 steps x 4 samples: 1 rank 1x4, 1 rank 4x1, 2 ranks 1x2 each."""
    tmp = tmp_path_factory.mktemp("train")
    shapes = {"mb4": (1, 4, 1), "acc4": (1, 1, 4), "ranks2": (2, 1, 2)}
    out = {}
    for name, (nproc, mbs, gas) in shapes.items():
        r = base_recipe(tmp, name=name, train={"max_steps": 3, "micro_batch_size": mbs, "grad_accum": gas,
                                               "lr": 1e-3, "warmup_steps": 0, "gradient_checkpointing": name == "acc4"},
                        data={"train": [{"path": str(Path(__file__).parent.parent / "examples/data/alpaca/alpaca_en_demo.json"),
                                         "format": "alpaca"}], "max_len": 128, "eval_split": 0.02},
                        checkpoint={"every": 2})
        zerotune("train", str(write_recipe(tmp, r, f"{name}.yaml")), "--nproc", str(nproc))
        out[name] = tmp / "runs" / name
    return out


def test_accumulation_and_world_size_do_not_change_loss_or_update(runs):
    ref = train_losses(runs["mb4"])
    assert sorted(ref) == [1, 2, 3]
    for other in ("acc4", "ranks2"):
        got = train_losses(runs[other])
        for s in ref:
            assert got[s] == pytest.approx(ref[s], rel=1e-5), (other, s, got[s], ref[s])
        # Same update: compare what training changed. Adam divides by sqrt(v), so a parameter whose
        # gradient is ~0 can move by a different fraction of lr when the gradient's last bits differ
        # (summation order differs between 1x4, 4x1 and 2 ranks); the update as a whole must agree.
        w0 = initial_weights()
        w_ref, w = final_weights(runs["mb4"]), final_weights(runs[other])
        assert w.keys() == w_ref.keys()
        for k in w_ref:
            d_ref, d = w_ref[k] - w0[k], w[k] - w0[k]
            rel = ((d - d_ref).norm() / d_ref.norm()).item()
            assert rel < 1e-3, f"{other}: {k}: update differs by {rel:.2e} (relative norm)"


def test_run_dir_holds_everything(runs):
    run = runs["ranks2"]
    for f in ("recipe.yaml", "ds_config.json", "metrics.jsonl", "final/config.json", "final/model.safetensors",
              "final/tokenizer.json", "checkpoints/step-000002/COMPLETE", "checkpoints/step-000003/COMPLETE"):
        assert (run / f).exists(), f
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    cfg = json.loads((run / "ds_config.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_batch_size"] == 4
    assert "auto" not in json.dumps(cfg)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in r for r in recs)


def test_final_export_matches_the_trained_engine(runs):
    """final/ (gathered from ZeRO-3 shards by the loop) reloads with from_pretrained and gives the
    same logits as the engine's own fp32 weights, consolidated from the last DeepSpeed checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run = runs["ranks2"]
    final = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    engine_model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step-000003")
    missing, unexpected = engine_model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)  # lm_head is tied to the embeddings
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok("### Instruction:\nName three colors.\n\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(final(ids).logits, engine_model(ids).logits, rtol=0, atol=0)
        out = final.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_each_rank_makes_its_gpu_current_before_the_process_group(monkeypatch):
    """NCCL binds a group to LOCAL_RANK's GPU; a collective before deepspeed.initialize (the resume
    decision's broadcast) used cuda:0 on every rank until the device was set first (4xH200:
    "Tensor found on device cuda:0 but backend constrained to cuda:3"). The GPU test below runs it."""
    import deepspeed
    from datetime import timedelta
    from zerotune.training.run import engine
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda timeout: calls.append(("init", timeout)))
    engine.init_distributed(7)
    assert calls == [("set_device", 3), ("init", timedelta(minutes=7))]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_train_and_resume_through_zerotune_train(tmp_path):
    """`zerotune train --nproc 2` on CUDA with NCCL (torch's fused AdamW): a run killed in its save of
    step 4 resumes on 2 GPUs, killed again in its save of step 6 resumes on 1 GPU (a universal
    checkpoint: the Adam steps must land on the GPU, reshard.place_step_counts); its losses equal an
    uninterrupted 8-step run's on 2 GPUs at every step."""
    from test_checkpoint import crash_at_save
    r = base_recipe(tmp_path, checkpoint={"every": 2}, train={"global_batch_size": 8, "max_steps": 8})
    zerotune("train", str(write_recipe(tmp_path, {**r, "name": "straight"}, "straight.yaml")), "--nproc", "2")
    want = train_losses(tmp_path / "runs" / "straight")
    recipe = write_recipe(tmp_path, r)
    crash_at_save(recipe, 2, 4)
    crash_at_save(recipe, 2, 6)     # resumed from step-000002 on 2 GPUs, killed in the save of step 6
    proc = zerotune("train", str(recipe), "--nproc", "1")
    assert "resumed from step-000004" in proc.stdout + proc.stderr
    got = train_losses(tmp_path / "runs" / "t")
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:   # CUDA kernels and another GPU count sum in another order: not bitwise
        assert got[step] == pytest.approx(want[step], rel=1e-3), (step, got, want)
