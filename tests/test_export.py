"""`zerotune export` of full runs (ZeRO-3 and ZeRO-2, 2 processes) and its errors. The runs
come from test_peft.py's session fixture (one torchrun launch trains everything)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import zerotune  # noqa: E402,F401
from test_peft import PROBE, runs  # noqa: E402,F401  (the session fixture)


def cli(capsys, *args) -> tuple[int, str, str]:
    """The real command, in-process (saves the imports of a subprocess)."""
    from zerotune.launcher.cli import main
    rc = main(["export", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def logits(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE)).logits


@pytest.mark.slow
@pytest.mark.parametrize("run", ["full-z3", "full-z2"])
def test_full_export_streams_shards_and_matches_the_engine(runs, run, tmp_path, capsys):
    """Export from the ZeRO checkpoint on CPU, in small shards, equals the weights the engine
    gathered at the end of training (RUN_DIR/final), and carries config, generation config,
    tokenizer and the run's chat template."""
    import torch
    from safetensors.torch import load_file
    out = tmp_path / "hf"
    assert cli(capsys, str(runs[run]), "--out", str(out), "--max-shard-size", "200KB")[0] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert "### Instruction" in (out / "chat_template.jinja").read_text()
    exported = {k: v for s in shards for k, v in load_file(str(out / s)).items()}
    final = {}
    for f in (runs[run] / "final").glob("*.safetensors"):
        final.update(load_file(str(f)))
    assert set(exported) == set(final)
    for k in final:
        assert torch.equal(exported[k], final[k]), k
    torch.testing.assert_close(logits(out), logits(runs[run] / "final"), rtol=0, atol=0)


@pytest.mark.slow
def test_export_of_an_adapter_run_from_the_command_line(runs, tmp_path):
    out = tmp_path / "adapter"
    proc = zerotune("export", str(runs["lora"]), "--checkpoint", "step-3", "--out", str(out))  # a real subprocess
    assert "lora adapter" in proc.stdout
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and Path(config["base_model_name_or_path"]).is_dir()
    assert (out / "adapter_model.safetensors").stat().st_size < 1_000_000


@pytest.mark.slow
def test_export_errors_are_one_line(runs, tmp_path, capsys):
    rc, _, err = cli(capsys, str(runs["lora"]), "--checkpoint", "step-99", "--out", str(tmp_path / "x"))
    assert rc == 2 and "step-000099 is not a complete checkpoint (complete ones: step-000003)" in err
    rc, _, err = cli(capsys, str(tmp_path), "--out", str(tmp_path / "x"))
    assert rc == 2 and "not a run folder" in err


@pytest.mark.slow
def test_lora_at_zero3_final_equals_export(runs, tmp_path, capsys):
    """ZeRO-3 LoRA: the adapter gathered at the end of training and the one exported from the
    checkpoint's fp32 partitions are the same."""
    import torch
    from safetensors.torch import load_file
    out = tmp_path / "adapter"
    assert cli(capsys, str(runs["lora-z3"]), "--out", str(out))[0] == 0
    final = load_file(str(runs["lora-z3"] / "final" / "adapter_model.safetensors"))
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert set(final) == set(exported) and any("lora_B" in k for k in final)
    for k in final:
        assert torch.equal(final[k], exported[k]), k


@pytest.mark.slow
def test_export_never_unpickles_objects(runs, tmp_path, capsys):
    """A checkpoint file holding a pickled callable is refused, not executed."""
    import torch
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run, ignore=shutil.ignore_patterns("final", "tensorboard", "*.safetensors"))
    ckpt = run / "checkpoints" / "step-000003"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"module": {}, "evil": Evil()}, ckpt / "mp_rank_00_model_states.pt")
    rc, _, err = cli(capsys, str(run), "--out", str(tmp_path / "x"))
    assert rc == 2 and "refusing to load" in err
    assert not marker.exists()
