"""RUN_DIR/final streamed shard by shard from the ranks (issue 13): a tiny Llama built here,
trained one step by a real DeepSpeed engine on 2 gloo processes, saved by save_final in small
shards; transformers loads the folder and its logits equal the engine's; the files and index are
the ones save_pretrained writes.

This file is also the worker torchrun starts:
`python -m torch.distributed.run --nproc_per_node 2 tests/test_export_stream.py MODEL OUT ZERO SHARD`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, STORIES, base_recipe  # noqa: E402

PROBE = [[1, 403, 261, 378, 275, 40, 269, 296], [1, 13, 35, 35, 35, 508, 299, 293]]
SHARD = 100_000   # bytes: the tiny model (~0.5 MB in fp32) makes several shards


def tiny_llama(folder: Path, tied: bool) -> Path:
    """A random Llama with stories260K's vocabulary (512), ~120k parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- the worker
def _worker(model_dir: str, out: str, zero: int, shard: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.export.write import save_final
    from zerotune.training.model.build import build_model
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    recipe = validate_recipe(base_recipe(Path(out), model={"path": model_dir, "tokenizer": str(STORIES),
                                                           "dtype": "fp32", "chat_template": "alpaca"}))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0}}
    model = build_model(recipe, ds_config)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      optimizer=torch.optim.AdamW(params, lr=1e-2))
    probe = torch.tensor(PROBE)
    engine.train()
    engine.backward(engine(input_ids=probe, labels=probe).loss)   # the weights move away from the files'
    engine.step()
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe).logits
    if rank == 0:
        torch.save(logits, Path(out) / "engine_logits.pt")
    save_final(engine, model, recipe, Path(out) / "final", rank, max_shard_size=shard)
    dist.destroy_process_group()


def run_workers(model_dir: Path, out: Path, zero: int, nproc: int = 2) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           __file__, str(model_dir), str(out), str(zero), str(SHARD)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"workers exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


# ----------------------------------------------------------------------------- the tests
def test_shard_writer_names_and_index_as_save_pretrained(tmp_path):
    """Shards filled in order; a tensor larger than a shard gets its own, numbered before the
    shard being filled (huggingface_hub's split_torch_state_dict_into_shards); one shard is
    model.safetensors with no index."""
    import torch
    from safetensors.torch import load_file

    from zerotune.training.export.stream import ShardWriter
    tensors = {"a": torch.ones(10), "b": torch.ones(20), "big": torch.ones(100), "c": torch.ones(15)}
    w = ShardWriter(tmp_path, max_shard_size=160)
    for k, v in tensors.items():
        w.add(k, v)
    assert w.close(total_parameters=145) == {"a": "model-00002-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
                                             "big": "model-00001-of-00003.safetensors", "c": "model-00003-of-00003.safetensors"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 145, "total_size": 580}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json"]
    assert torch.equal(load_file(str(tmp_path / "model-00001-of-00003.safetensors"))["big"], tensors["big"])
    from huggingface_hub import split_torch_state_dict_into_shards
    hub = split_torch_state_dict_into_shards(tensors, max_shard_size=160)
    assert hub.tensor_to_filename == json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    one = tmp_path / "one"
    one.mkdir()
    w = ShardWriter(one, max_shard_size=10**6)
    w.add("a", tensors["a"])
    w.close()
    assert [p.name for p in one.iterdir()] == ["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("zero,tied", [(3, True), (2, False)])
def test_final_is_streamed_in_shards_and_loads_with_the_engines_logits(tmp_path, zero, tied):
    import torch
    from transformers import AutoModelForCausalLM
    model_dir = tiny_llama(tmp_path / "tiny", tied)
    run_workers(model_dir, tmp_path, zero)
    final = tmp_path / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((final / s).is_file() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) is not tied   # a tied lm_head is saved once, as embed_tokens
    assert not list(final.glob("*.tmp")) and not list(tmp_path.glob(".final.*"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    with torch.no_grad():
        got = reloaded(input_ids=torch.tensor(PROBE)).logits
    torch.testing.assert_close(got, torch.load(tmp_path / "engine_logits.pt"), rtol=0, atol=0)
    # save_pretrained of the same weights writes the same names, sizes, shard count and config (which
    # tensor goes to which shard follows the state-dict order, and from_pretrained reorders it)
    ref = tmp_path / "ref"
    reloaded.save_pretrained(ref, max_shard_size=SHARD)
    ref_index = json.loads((ref / "model.safetensors.index.json").read_text())
    assert index["metadata"] == ref_index["metadata"] and set(index["weight_map"]) == set(ref_index["weight_map"])
    assert shards == sorted(set(ref_index["weight_map"].values()))
    for name in ("config.json", "generation_config.json"):
        mine, theirs = json.loads((final / name).read_text()), json.loads((ref / name).read_text())
        assert {k: v for k, v in mine.items() if k != "use_cache"} == {k: v for k, v in theirs.items()
                                                                       if k != "use_cache"}, name


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
