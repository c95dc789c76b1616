"""Trackers (logging.report_to: tensorboard, wandb, mlflow), what they are told (MFU with its
formula, the time split) and eval-prompt samples.

Every sink is read back from its own files: TensorBoard event files, wandb's offline run files
(RUN_DIR/wandb/offline-run-*/run-<id>.wandb, parsed record by record), MLflow's file store
(RUN_DIR/mlruns, through MlflowClient). A resumed run must report to the SAME wandb and MLflow
runs (ids kept in RUN_DIR/trackers.json) with its steps continuing.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, STORIES, base_recipe, write_recipe, zerotune
from test_monitoring import log_steps, make_metrics, scalars
from zerotune.core.layout import REQUEUE_EXIT_CODE
from zerotune.core.recipe_load import validate_recipe

ALL = ["tensorboard", "wandb", "mlflow"]


def offline_env(tmp_path: Path) -> dict:
    """wandb offline with its home folders in tmp; MLflow on its default store (RUN_DIR/mlruns)."""
    home = str(tmp_path / "wandb-home")
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": home, "WANDB_CACHE_DIR": home,
            "WANDB_DATA_DIR": home}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k, v in offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what MlflowTracker sets; restored after the test


# ----------------------------------------------------------------------------- reading the sinks back
def wandb_records(path: Path):
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "train/loss" is stored as the nested key [train, loss]


def wandb_attempts(run_dir: Path) -> list[dict]:
    """One dict per offline attempt, oldest first: run id, config, history rows, summary, files."""
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        a = {"id": None, "config": {}, "history": [], "summary": {}, "files": d / "files"}
        for r in wandb_records(next(d.glob("run-*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                a["id"] = r.run.run_id
                a["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                a["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                a["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                a["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        out.append(a)
    return out


def series(rows: list[dict], tag: str) -> list[tuple[int, float]]:
    return [(row["train/step"], row[tag]) for row in rows if tag in row]


def tb_texts(run_dir: Path) -> dict[str, str]:
    """tag -> the last text TensorBoard shows for it."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    out = {}
    for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for e in EventFileLoader(str(f)).Load():
            out.update({v.tag: v.tensor.string_val[0].decode() for v in e.summary.value
                        if v.metadata.plugin_data.plugin_name == "text"})
    return out


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient
    ids = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ids["uri"])
    return client, client.get_run(ids["run_id"])


def mlflow_series(client, run, tag: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))


def artifacts(client, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path or None):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


# ----------------------------------------------------------------------------- the recipe keys
def test_report_to_keys_and_the_older_tensorboard_switch(tmp_path):
    def logging(**keys):
        r = validate_recipe(base_recipe(tmp_path, logging=keys))
        again = validate_recipe(r.model_dump(mode="json"))  # RUN_DIR/recipe.yaml reads back the same
        assert (again.logging.report_to, again.logging.tensorboard) == (r.logging.report_to, r.logging.tensorboard)
        return r.logging.report_to, r.logging.tensorboard
    assert logging() == (["tensorboard"], True)
    assert logging(tensorboard=False) == ([], False)                 # older recipes keep working
    assert logging(report_to="wandb") == (["wandb"], False)
    assert logging(report_to=["tensorboard", "mlflow", "mlflow"]) == (["tensorboard", "mlflow"], True)
    with pytest.raises(ValueError, match="tensorboard: false contradicts report_to"):
        logging(tensorboard=False, report_to=["tensorboard"])
    with pytest.raises(ValueError, match="'comet' is not one of tensorboard, wandb, mlflow"):
        logging(report_to=["comet"])
    with pytest.raises(ValueError, match="eval_prompts: a prompt is empty"):
        validate_recipe(base_recipe(tmp_path, train={"eval_prompts": ["Hi", "  "]}))
    assert validate_recipe(base_recipe(tmp_path)).train.eval_max_new_tokens == 32


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util
    from zerotune.core.errors import UserError
    from zerotune.training.monitoring.tracker_setup import check_trackers
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = validate_recipe(base_recipe(tmp_path, logging={"report_to": ["tensorboard", "wandb"]}))
    with pytest.raises(UserError) as e:
        check_trackers(recipe)
    assert str(e.value) == "logging.report_to: wandb needs the wandb package: pip install 'zerotune[wandb]'"
    with pytest.raises(UserError):  # Metrics checks on every rank, before anything is written
        make_metrics(tmp_path, logging={"report_to": ["wandb"], "progress": False})
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    check_trackers(validate_recipe(base_recipe(tmp_path, logging={"report_to": ["mlflow"]})))


# ----------------------------------------------------------------------------- Metrics in-process
def test_every_tracker_gets_the_same_run_and_a_resume_continues_it(tmp_path, offline):
    keys = {"report_to": ALL, "progress": False}
    m, run_dir = make_metrics(tmp_path, total=4, logging=keys)
    log_steps(m, [1, 2, 3])                       # checkpoint at 2, then a crash after step 3
    m.eval(2, 2.5)
    m.close(finished=False)
    ids = json.loads((run_dir / "trackers.json").read_text())
    m, _ = make_metrics(tmp_path, start_step=2, total=4, logging=keys)   # resumed from step 2
    log_steps(m, [3, 4], loss=1.5)
    m.eval(4, 1.25)
    m.samples(4, [("Say hi | twice", "hi\nhi")])
    m.close(final_eval_loss=1.25)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids

    assert scalars(run_dir)["train/loss"] == [(1, 2.0), (2, 2.0), (3, 1.5), (4, 1.5)]   # TensorBoard purges

    first, second = wandb_attempts(run_dir)
    assert first["id"] == second["id"] == ids["wandb"]["id"]
    assert series(first["history"], "train/loss") == [(1, 2.0), (2, 2.0), (3, 2.0)]
    assert series(second["history"], "train/loss") == [(3, 1.5), (4, 1.5)]   # train/step continues
    assert series(first["history"] + second["history"], "eval/loss") == [(2, 2.5), (4, 1.25)]
    assert second["config"]["recipe"]["name"] == "t" and second["config"]["lr"] == 1e-3
    assert second["summary"]["hparam/final_eval_loss"] == 1.25
    assert "6 x N_matmul" in (second["files"] / "config" / "mfu.md").read_text()
    table = json.loads(next((second["files"] / "media" / "table" / "eval").glob("samples_*.table.json")).read_text())
    assert table["columns"] == ["step", "prompt", "completion"] and table["data"] == [[4, "Say hi | twice", "hi\nhi"]]

    client, run = mlflow_run(run_dir)
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert (run_dir / "mlruns").is_dir() and ids["mlflow"]["uri"].startswith("file://")
    assert mlflow_series(client, run, "train/loss") == [(1, 2.0), (2, 2.0), (3, 1.5), (3, 2.0), (4, 1.5)]
    assert mlflow_series(client, run, "eval/loss") == [(2, 2.5), (4, 1.25)]
    assert mlflow_series(client, run, "hparam/final_eval_loss") == [(4, 1.25)]
    assert run.data.params["lr"] == "0.001" and run.data.params["method"] == "full"
    files = artifacts(client, run.info.run_id)
    assert {"config/recipe.md", "config/ds_config.md", "config/mfu.md", "config/time.md",
            "eval/samples/step-000004.md"} <= files
    sample = client.download_artifacts(run.info.run_id, "eval/samples/step-000004.md", str(tmp_path))
    assert Path(sample).read_text().splitlines()[2] == "| Say hi \\| twice | hi<br>hi |"
    samples = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "samples"]
    assert samples == [{"time": samples[0]["time"], "step": 4, "event": "samples",
                        "samples": [{"prompt": "Say hi | twice", "completion": "hi\nhi"}]}]


# ----------------------------------------------------------------------------- MFU and the time split, stated
def test_mfu_with_its_formula_and_the_time_split(tmp_path, monkeypatch):
    import time
    from zerotune.core.flops import flops_per_token
    monkeypatch.setenv("ZEROTUNE_PEAK_TFLOPS", "100")
    m, run_dir = make_metrics(tmp_path)
    with m.time("data"):
        time.sleep(0.05)
    with m.time("fwd_bwd"):
        time.sleep(0.1)
    with m.time("comm"):                                  # a phase the loop may add: time/comm_s
        pass
    m.step(1, seconds=1.0, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=5000, samples=8, epoch=0.1, seq_len=128)
    m.close()
    s = {tag: v[0][1] for tag, v in scalars(run_dir).items()}
    fpt = flops_per_token(json.loads((STORIES / "config.json").read_text()), 128)
    assert s["train/mfu"] == pytest.approx(5000 * fpt / 100e12, rel=1e-5)
    assert s["time/data_wait_s"] >= 0.05 and s["time/fwd_bwd_s"] >= 0.1 and "time/comm_s" in s
    assert "time/optimizer_s" not in s                    # not timed this step: nothing made up
    parts = s["time/data_wait_s"] + s["time/fwd_bwd_s"] + s["time/comm_s"]
    assert s["time/other_s"] == pytest.approx(1.0 - parts, abs=1e-6)
    t = tb_texts(run_dir)
    mfu = t["config/mfu/text_summary"]
    assert "train/mfu = train/tokens_per_sec x F(seq_len) / (world_size x peak FLOP/s per GPU)" in mfu
    assert "F = 6 x N_matmul + 6 x layers x seq_len x heads x head_dim" in mfu
    assert f"- F: {fpt:.4g} at seq_len 128" in mfu and "- peak: 100 TFLOP/s (cpu), dense bf16" in mfu
    assert "- world_size: 1" in mfu and "gradient checkpointing off" in mfu
    for tag in ("time/step_s", "time/data_wait_s", "time/fwd_bwd_s", "time/optimizer_s", "time/other_s"):
        assert f"| {tag} |" in t["config/time/text_summary"]


# ----------------------------------------------------------------------------- a real run, preempted and resumed
@pytest.mark.slow
def test_real_run_reports_to_all_three_and_the_resume_continues_them(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, base_recipe(
        tmp_path, data={"max_len": 64, "eval_split": 0.02},
        train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "eval_every": 2, "eval_batches": 1},
        checkpoint={"every": 2, "save_final": False}, logging={"report_to": ALL, "progress": False}))
    run_dir = tmp_path / "runs" / "t"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)     # the run opts in to MLflow 3's file store itself
    env = {**offline_env(tmp_path), "MLFLOW_TRACKING_URI": (tmp_path / "store").as_uri()}  # a file store named
    a = zerotune("train", str(recipe), check=False, env={**env, "ZEROTUNE_TEST_SIGNAL": "3:0"})
    assert a.returncode == REQUEUE_EXIT_CODE, a.stderr[-3000:]       # SIGUSR1 after step 3: saved, requeue
    ids = json.loads((run_dir / "trackers.json").read_text())
    zerotune("train", str(recipe), env=env)                           # resumes from step 3
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")            # for MlflowClient here, reading it back

    tb = scalars(run_dir)["train/loss"]
    assert [s for s, _ in tb] == [1, 2, 3, 4]
    first, second = wandb_attempts(run_dir)
    assert first["id"] == second["id"] == ids["wandb"]["id"]
    assert [s for s, _ in series(first["history"], "train/loss")] == [1, 2, 3]
    assert [s for s, _ in series(second["history"], "train/loss")] == [4]
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and (tmp_path / "store").is_dir() and not (run_dir / "mlruns").exists()
    ml = mlflow_series(client, run, "train/loss")
    assert [s for s, _ in ml] == [1, 2, 3, 4]                          # one point per step, one run
    assert [s for s, _ in mlflow_series(client, run, "eval/loss")] == [2, 4]
    wb = series(first["history"] + second["history"], "train/loss")
    for (_, t), (_, w), (_, f) in zip(tb, wb, ml):
        assert t == pytest.approx(w, rel=1e-6) and w == f              # the same numbers everywhere
    assert float(run.data.params["total_steps"]) == 4 and first["config"]["recipe"]["train"]["max_steps"] == 4


# ----------------------------------------------------------------------------- eval prompt samples
def test_generate_samples_greedy_with_the_recipe_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from zerotune.training.model.samples import eval_samples, generate_samples, render_prompts
    recipe = validate_recipe(base_recipe(tmp_path, data={"system_prompt": "Be brief."},
                                         train={"eval_prompts": ["Tell me a story.", "Name a cat."],
                                                "eval_max_new_tokens": 12}))
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).train()
    texts = render_prompts(recipe, tok, ["Tell me a story."])
    assert texts == [tok.bos_token + "Be brief.\n\n### Instruction:\nTell me a story.\n\n### Response:\n"]  # alpaca
    got = generate_samples(model, tok, texts, max_new_tokens=12)
    assert model.training                                               # mode restored
    ids = tok(texts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    want = model.eval().generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    assert got == [tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True).strip()] and got[0]
    pairs = eval_samples(model, tok, recipe)
    assert [p for p, _ in pairs] == ["Tell me a story.", "Name a cat."] and pairs[0][1] == got[0]
    text = validate_recipe(base_recipe(tmp_path, data={"train": [{"path": "x.jsonl", "format": "text"}]}))
    assert render_prompts(text, tok, ["Once upon"]) == [tok.bos_token + "Once upon"]


ZERO3_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, deepspeed
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.launcher.ds_config import render
    from zerotune.training.run.engine import build_engine
    from zerotune.training.data.build import load_tokenizer
    from zerotune.training.model.build import build_model
    from zerotune.training.model.samples import eval_samples, is_zero3
    deepspeed.init_distributed()
    recipe = validate_recipe(json.loads(sys.argv[1]))
    ds = render(recipe, 2, stage=3)
    engine = build_engine(build_model(recipe, ds), ds, recipe.train, 10)
    engine.train()
    pairs = eval_samples(engine, load_tokenizer(recipe), recipe)
    with open(f"{sys.argv[2]}/result-{os.environ['RANK']}.json", "w") as f:
        json.dump({"pairs": pairs, "zero3": is_zero3(engine.module), "training": engine.module.training}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_generate_samples_under_zero3_on_two_ranks(tmp_path):
    """Two ranks, parameters partitioned: both run generate with synced_gpus and get the text one
    process gets from the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from zerotune.training.model.samples import generate_samples, render_prompts
    recipe = base_recipe(tmp_path, train={"micro_batch_size": 1, "grad_accum": 1, "eval_max_new_tokens": 10,
                                          "eval_prompts": ["Tell me a story.", "What is the sun?"]})
    (tmp_path / "zero3.py").write_text(ZERO3_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(tmp_path / "zero3.py"), json.dumps(recipe), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    found = sorted(tmp_path.glob("result-*.json"))
    assert [f.name for f in found] == ["result-0.json", "result-1.json"], proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in found]
    r = validate_recipe(recipe)
    tok = AutoTokenizer.from_pretrained(STORIES)
    want = generate_samples(AutoModelForCausalLM.from_pretrained(STORIES), tok,
                            render_prompts(r, tok, r.train.eval_prompts), 10)
    assert all(want)
    for res in results:
        assert res["zero3"] and res["training"]
        assert res["pairs"] == [[p, w] for p, w in zip(r.train.eval_prompts, want)], res
