"""Sequence parallelism through the commands users run (`zerotune train`, `zerotune plan`):
real torchrun, gloo on CPU, fp32, ZeRO-3, packed rows (several samples per row).

Two processes sharing every sequence (distributed.sequence_parallel: 2, one data-parallel
replica) train exactly like one process without SP on the same global batch: the same loss
each step, the same eval loss, the same update. A checkpoint saved with SP=2 resumes with SP=1
on the same two processes (two replicas, global_batch_size unchanged) and the run goes on as
if nothing had changed. Tests of the parts (sharding, attention, gradients) are in
tests/test_sequence_parallel.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import base_recipe, train_losses, write_recipe, zerotune

pytestmark = pytest.mark.slow


def sp_recipe(tmp: Path, name: str, sp: int, **train) -> dict:
    return base_recipe(tmp, name=name,
                       train={"max_steps": 3, "micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-3,
                              "warmup_steps": 0, "scheduler": "constant", **train},   # max_steps may change
                       data={"max_len": 256, "packing": True, "eval_split": 0.02},
                       distributed={"zero": 3, "sequence_parallel": sp}, checkpoint={"every": 2})


def events(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_losses(run_dir: Path) -> list[float]:
    return [r["eval/loss"] for r in events(run_dir) if "eval/loss" in r]


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    out = {}
    for name, nproc, sp in (("sp1", 1, 1), ("sp2", 2, 2)):
        out[name] = zerotune("train", str(write_recipe(tmp, sp_recipe(tmp, name, sp), f"{name}.yaml")),
                             "--nproc", str(nproc))
    # SP=2 stops after step 2; the same run goes on with SP=1 on the same 2 processes
    first = write_recipe(tmp, sp_recipe(tmp, "switch", 2, max_steps=2), "switch-a.yaml")
    out["switch-a"] = zerotune("train", str(first), "--nproc", "2")
    then = write_recipe(tmp, sp_recipe(tmp, "switch", 1), "switch-b.yaml")
    out["switch-b"] = zerotune("train", str(then), "--nproc", "2")
    out["dir"] = tmp / "runs"
    return out


def test_two_ranks_sharing_each_sequence_train_like_one_process(runs):
    ref, got = train_losses(runs["dir"] / "sp1"), train_losses(runs["dir"] / "sp2")
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])
    ref_eval, got_eval = eval_losses(runs["dir"] / "sp1"), eval_losses(runs["dir"] / "sp2")
    assert len(ref_eval) == len(got_eval) >= 1
    assert got_eval == pytest.approx(ref_eval, rel=1e-5)
    w_ref, w = final_weights(runs["dir"] / "sp1"), final_weights(runs["dir"] / "sp2")
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        rel = ((w[k] - w_ref[k]).norm() / w_ref[k].norm()).item()
        assert rel < 1e-5, f"{k}: final weights differ by {rel:.2e}"


def test_the_run_says_what_it_runs(runs):
    run = runs["dir"] / "sp2"
    cfg = json.loads((run / "ds_config.json").read_text())
    # one data-parallel replica: 2 micro-batches of 2 rows make the global batch of 4
    assert cfg["sequence_parallel_size"] == 2 and cfg["train_batch_size"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert "(sequence parallel 2)" in runs["sp2"].stdout
    def seen(name):   # tokens and packing of the whole run, from its last checkpoint and its log
        state = json.loads((runs["dir"] / name / "checkpoints" / "step-000003" / "zerotune_state.json").read_text())
        packing = [r["data/packing_efficiency"] for r in events(runs["dir"] / name) if "train/loss" in r]
        return state["loop"]["tokens_seen"], packing
    assert seen("sp2") == seen("sp1")   # each sequence counted once, not once per rank of its group


def test_a_checkpoint_resumes_with_another_sequence_parallel_degree(runs):
    run = runs["dir"] / "switch"
    assert "resumed from step-000002" in runs["switch-b"].stdout, runs["switch-b"].stdout[-3000:]
    assert "sequence parallel" not in runs["switch-b"].stdout.split("resumed from")[0].splitlines()[-1]
    ref, got = train_losses(runs["dir"] / "sp1"), train_losses(run)
    assert sorted(got) == [1, 2, 3]
    for s in ref:   # step 3 reads the same samples (the sampler moved from 1 replica to 2)
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])
    assert json.loads((run / "ds_config.json").read_text()).get("sequence_parallel_size") is None


def test_a_degree_the_node_cannot_split_is_refused_before_anything_is_written(tmp_path):
    recipe = write_recipe(tmp_path, sp_recipe(tmp_path, "bad", 4))
    p = zerotune("train", str(recipe), "--nproc", "2", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "distributed.sequence_parallel: 4 must divide the GPUs of a node (2)" in p.stderr
    assert not (tmp_path / "runs" / "bad").exists()
    heads = write_recipe(tmp_path, sp_recipe(tmp_path, "heads", 3), "heads.yaml")   # 8 heads, 3 GPUs
    p = zerotune("train", str(heads), "--nproc", "3", check=False)
    assert p.returncode == 2 and "3 must divide the model's 8 attention heads" in p.stderr, p.stderr[-2000:]


# ----------------------------------------------------------------------------- the planner
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
             "max_position_embeddings": 131072}


def long_recipe(tmp_path: Path, sp: int) -> Path:
    model = tmp_path / "llama3-8b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    r = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "llama3-8b-long-context.yaml").read_text())
    r["model"]["path"] = str(model)
    r["data"]["train"][0]["path"] = str(Path(__file__).parent.parent / "examples/data/alpaca/alpaca_en_demo.json")
    r["distributed"]["sequence_parallel"] = sp
    return write_recipe(tmp_path, r, f"long-{sp}.yaml")


def test_plan_finds_the_smallest_degree_that_fits_a_long_sequence(tmp_path):
    """256k-token packed rows, full 8B, 4 x 80 GB: without SP nothing fits, not even with every
    checkpoint in CPU memory (the plan says which degree does: the smallest, the planner free to
    checkpoint, tile and offload by the layer as at that degree); with that degree the table counts
    256k / N tokens per GPU and recommends a strategy."""
    seq = 262144
    longer = ("--gpus", "4", "--gpu-memory", "80GB", "--set", f"data.max_len={seq}")
    p = zerotune("plan", str(long_recipe(tmp_path, 1)), *longer, check=False)
    assert p.returncode == 1 and "recommended: nothing fits" in p.stdout, p.stdout[-3000:]
    hint = p.stdout.strip().splitlines()[-1]
    assert hint.startswith("long sequences: with --set distributed.sequence_parallel="), hint
    n = int(hint.split("sequence_parallel=")[1].split()[0])
    assert n == 2, hint   # per-layer offload and MLP tiling make 2 enough (4 without them)
    ok = zerotune("plan", str(long_recipe(tmp_path, n)), *longer)
    assert f"sequence parallel {n} ({seq // n:,} tokens per GPU)" in ok.stdout
    recommended = next(ln for ln in ok.stdout.splitlines() if ln.startswith("recommended: "))
    assert recommended.startswith("recommended: full ZeRO-") and ok.returncode == 0
    assert hint.split(" fits at ")[0].endswith(recommended.removeprefix("recommended: ").split(" (")[0]), (hint, recommended)
    too_long = zerotune("plan", str(long_recipe(tmp_path, 1)), "--gpus", "4", "--gpu-memory", "80GB",
                        "--set", "data.max_len=4194304", check=False)
    assert "no sequence-parallel degree up to the 4 GPUs of a node fits 4,194,304 tokens" in too_long.stdout


def test_lora_with_sequence_parallelism_trains_like_one_process(tmp_path):
    def run(name, nproc, sp):
        r = sp_recipe(tmp_path, name, sp, max_steps=2)
        r["method"] = {"kind": "lora", "lora": {"r": 4, "dropout": 0.0}}
        r["checkpoint"] = {"save_final": False}
        zerotune("train", str(write_recipe(tmp_path, r, f"{name}.yaml")), "--nproc", str(nproc))
        return train_losses(tmp_path / "runs" / name)
    ref, got = run("lora1", 1, 1), run("lora2", 2, 2)
    assert sorted(got) == sorted(ref) == [1, 2]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])
