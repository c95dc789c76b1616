"""A quiet console (core/quiet.py): zerotune's own lines on the terminal, other packages'
warnings, banners and logging in RUN_DIR/logs."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, zerotune  # noqa: E402

# What zerotune writes on the console of a run: its messages, the progress and eval lines.
# zerotune's own warnings: training/monitoring/console.py warn ("WARNING: step N: ...") and
# tracker_setup.py's mlflow line; another package's "WARNING: ..." is not ours.
OURS = re.compile(r"^(zerotune: |step \d+/\d+ [|] |data: |done: |final model: |method \w+: "
                  r"|WARNING: step \d+: |WARNING: mlflow run )")


def test_only_zerotunes_own_warning_lines_count_as_ours(capsys):
    from zerotune.training.monitoring.console import Console
    Console(0, 1, 0, progress=False).warn("step 3: loss is nan; update skipped")
    ours = capsys.readouterr().out.strip()
    assert OURS.match(ours), ours
    for foreign in ("WARNING: Logging before flag parsing goes to stderr.", "WARNING: 2026-12-06 deprecated"):
        assert not OURS.match(foreign), foreign


def test_other_packages_lines_go_to_the_log_ours_to_the_console(tmp_path, capsys):
    from zerotune.core import quiet
    from zerotune.training.monitoring.console import Console
    log = tmp_path / "logs" / "launcher.log"
    with quiet.route():
        other = logging.getLogger("some_package")
        other.addHandler(logging.StreamHandler())   # as transformers and DeepSpeed do: to sys.stderr
        other.propagate = False
        other.warning("a third-party log line")
        Console(0, 1, 0, progress=False).say("zerotune: our line")
        quiet.attach(log)                      # what waited in memory is written out
        print("a print from a test module (not zerotune's)")
        print("zerotune: through console()", file=quiet.console())
    out = capsys.readouterr()
    assert out.out.splitlines() == ["zerotune: our line"]
    assert out.err.splitlines() == ["zerotune: through console()"]
    text = log.read_text()
    for line in ("a third-party log line", "a print from a test module"):
        assert line in text
    assert "our line" not in text


@pytest.mark.slow
def test_the_demos_console_has_only_zerotunes_lines(tmp_path):
    """The demo's console prints no line zerotune did not write; RUN_DIR/logs holds the rest
    (DeepSpeed's accelerator banner, transformers' FutureWarning)."""
    proc = zerotune("train", str(ROOT / "recipes" / "demo.yaml"), "--set", "train.max_steps=4",
                    "--set", f"output_dir={tmp_path}", env={"PYTHONWARNINGS": "default"})
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if not OURS.match(line)] == []
    assert any(line.startswith("step 4/4 | ") for line in lines)
    logs = {p.name: p.read_text() for p in (tmp_path / "demo" / "logs").glob("*.log")}
    assert "rank-0.log" in logs and all(logs.values()), logs   # a log exists only with something in it
    assert "Setting accelerator to CPU" in logs["rank-0.log"]
    assert "gradient_checkpointing_enable" in logs["rank-0.log"]
