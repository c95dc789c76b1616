"""One benchmark command: zerotune (through `zerotune train`, the path users run) beside the
HF Trainer peer (benchmarks/peer_hf.py in each of its settings) and, on the chat workloads, TRL's
SFTTrainer (benchmarks/peer_trl.py, settings named trl-*), workload by workload, in one GPU call.

    python3 benchmarks/bench.py --only full-1b                      # one workload, every variant and peer setting
    python3 benchmarks/bench.py --only full-1b,lora-8b --variants default --peer-settings default,no-gc
    python3 benchmarks/bench.py --only chat-lora-8b --peer-settings trl-packing-liger-no-gc,liger-no-gc-mbs16
    python3 benchmarks/bench.py --only chat-lora-8b --size tiny --seq 256 --peer-settings trl-packing   # CPU smoke
    python3 benchmarks/bench.py --dry-run                            # print every command, run nothing
    python3 benchmarks/bench.py table benchmarks/results/2026-11-27-h100-80gb-hbm3.jsonl   # the README table

zerotune runs as `python -m zerotune.launcher.cli train RECIPE --nproc G --set ...` (data
loader, loop, metrics: RUN_DIR/metrics.jsonl is what is measured); a temporary folder of
symlinks makes `zerotune` importable from this checkout without installing it. The peer runs
as `python -m torch.distributed.run --standalone --nproc_per_node G benchmarks/peer_hf.py ...`
(torchrun). Models are random-initialised Llama-3 shapes (peer_hf.py's SIZES), made once on
the GPU and saved (bf16 safetensors) under --models. Every run has a timeout; a failure (OOM,
crash, timeout) is recorded with its last lines and the rest goes on.

Writes, under --results (default benchmarks/results):
    <date>-<device>.jsonl       one line per workload (a later call replaces its workloads' lines)
    <date>-<device>-runs.jsonl  one line per run: every zerotune variant, every peer setting
benchmarks/README.md explains every field.

This file is the command line and the Bench orchestration; its siblings hold the rest:
bench_setup.py (package shim, models, random-words data, the Plan of workloads, variants and
peer settings), bench_proc.py (running and killing process trees, log tails) and
bench_results.py (metrics and peer parsing, summaries, results files, the markdown table).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling modules, however bench.py is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# RESULT_KEYS, SHAREGPT, SIZES and TOKENIZER are re-exported: tests/test_bench.py reads them as bench.X
from bench_proc import detect_gpus, error_tail, is_oom, run_command  # noqa: E402
from bench_results import (RESULT_KEYS, device_slug, fmt_num, last_step, merge_results,  # noqa: E402,F401
                           parse_metrics, parse_peer, render_table, summarize, summarize_main, table_main)
from bench_setup import (ALPACA, PACKAGE_DIRS, PEER_SETTINGS, REPO, SHAREGPT, SIZES, TOKENIZER,  # noqa: E402,F401
                         TRL_SETTINGS, VARIANTS, WORKLOADS, Plan, child_env, make_model, make_package, model_dir,
                         random_words_file, repeated_file)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, a, plan: Plan, device: str):
        self.a, self.plan, self.device = a, plan, device
        self.t0 = time.time()
        results = Path(a.results)
        stem = f"{time.strftime('%Y-%m-%d')}-{device_slug(device)}"
        self.results_file = results / f"{stem}.jsonl"
        self.runs_file = results / f"{stem}-runs.jsonl"
        self.env = None

    def over_budget(self) -> bool:
        return self.a.budget_s is not None and time.time() - self.t0 > self.a.budget_s

    def record_run(self, rec: dict) -> None:
        self.runs_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.runs_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def prepare(self, workloads: list[str]) -> None:
        p = self.plan
        make_package(p.pkg)
        self.env = child_env(p.pkg)
        for size in dict.fromkeys(p.size(w) for w in workloads):
            path = model_dir(p.models, size)
            if (path / ".done").is_file():
                continue
            say(f"model {size}: making a random-initialised Llama-3 {size} in {path}")
            t = time.time()
            proc = subprocess.run([sys.executable, __file__, "_make-model", size, str(path)], env=self.env, cwd=REPO,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"making the {size} model failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
            say(f"model {size}: saved in {time.time() - t:.0f}s")
        for wl in workloads:
            w = WORKLOADS[wl]
            if w.get("repeat"):
                repeated_file(REPO / w["data"][0], p.work / "data", w["repeat"])
            elif not w.get("data"):
                random_words_file(p.work / "data", p.rows(wl), p.seq(wl))
            path = p.recipe_path(wl)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(p.recipe(wl), indent=1) + "\n")  # JSON is YAML

    def zerotune_run(self, wl: str, name: str, sets: list[str]) -> dict:
        p, a = self.plan, self.a
        run_dir = p.work / "runs" / p.run_name(wl, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        metrics = run_dir / "metrics.jsonl"
        log = p.work / "logs" / f"{p.run_name(wl, name)}.zerotune.log"
        cmd = p.zerotune_cmd(wl, name, sets)
        done = None if a.let_finish else (lambda: last_step(metrics) >= a.steps)
        say(f"{wl} zerotune {name}: {' '.join(sets) or '(recipe as is)'}")
        r = run_command(cmd, log, self.env, a.timeout, done)
        rec = {"workload": wl, "side": "zerotune", "name": name, "sets": sets, "cmd": shlex.join(cmd),
               "run_dir": str(run_dir), "log": str(log), **r}
        try:
            rec.update(parse_metrics(metrics, a.warmup))
            rec["ok"] = (r["rc"] == 0 or r["state"] == "stopped-after-last-step") and rec["last_step"] >= a.steps
        except (OSError, ValueError) as e:
            rec["ok"], rec["parse_error"] = False, str(e)
        if not a.keep_checkpoints:  # a full 8B checkpoint is ~110 GB: never let them pile up on the disk
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if not rec["ok"]:
            failed = run_dir / "FAILED"
            tail = error_tail(log)
            rec["error"] = (failed.read_text()[-1500:] + "\n" if failed.is_file() else "") + tail
            rec["error_kind"] = ("timeout" if r["state"] == "timeout" else "OOM" if is_oom(rec["error"])
                                 else f"exit {r['rc']}")
        return rec

    def peer_run(self, wl: str, name: str, extra: list[str]) -> dict:
        p, a = self.plan, self.a
        log = p.work / "logs" / f"{p.run_name(wl, name)}.peer.log"
        cmd = p.peer_cmd(wl, extra, name)
        say(f"{wl} peer {name}: {' '.join(extra) or '(defaults)'}")
        r = run_command(cmd, log, self.env, a.timeout)
        rec = {"workload": wl, "side": "peer", "name": name, "args": extra, "cmd": shlex.join(cmd), "log": str(log), **r}
        res = parse_peer(log)
        rec["ok"] = res is not None  # RESULT is printed after training: a crash at teardown does not undo it
        if res is not None:
            rec["result"] = res
            rec["tok_s_gpu"] = res.get("real_tok_s_gpu", res["tok_s_gpu"])
            rec["mfu"], rec["peak_gib"] = res.get("mfu"), res.get("peak_gib")
        if not rec["ok"]:
            rec["error"] = error_tail(log)
            rec["error_kind"] = "timeout" if r["state"] == "timeout" else "OOM" if is_oom(rec["error"]) else f"exit {r['rc']}"
        return rec

    def report(self, rec: dict) -> None:
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        rec["device"] = self.device
        self.record_run(rec)
        who = f"{rec['workload']} {rec['side']} {rec['name']}"
        if rec.get("ok"):
            mfu = f", MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
            peak = f", peak {rec['peak_gib']:.1f} GiB" if rec.get("peak_gib") is not None else ""
            say(f"{who}: {rec['tok_s_gpu']:,} tok/s/GPU{mfu}{peak} ({rec['wall_s']:.0f}s)")
        else:
            last = (rec.get("error") or rec.get("parse_error") or "").strip().splitlines()
            say(f"{who}: FAILED ({rec.get('error_kind')}, {rec['wall_s']:.0f}s): {last[-1] if last else ''}")

    def summary(self, wl: str, gpus: int, zt: list[dict], peer: list[dict]) -> dict:
        """The workload's results line from the runs so far, written at once (after every run,
        so a call cut short by its time limit keeps what it measured)."""
        w, p = WORKLOADS[wl], self.plan
        meta = {"date": time.strftime("%Y-%m-%d"), "size": p.size(wl), "method": w["method"], "mbs": w["mbs"],
                "seq": p.seq(wl), "steps": self.a.steps, "warmup": self.a.warmup,
                "data": w["data"][1] if w.get("data") else "random-words"}
        line = summarize(wl, self.device, gpus, zt, peer, meta)
        merge_results(self.results_file, [line])
        return line

    def workload(self, wl: str) -> dict | None:
        p = self.plan
        gpus, skip = p.gpus(wl)
        if skip:
            say(f"{wl}: skipped: {skip}")
            return None
        zt, peer = [], []
        jobs = [("zerotune", n, v) for n, v in p.variants(wl).items()] + \
               [("peer", n, v) for n, v in p.peer_settings(wl).items()]
        for side, name, args in jobs:
            if self.over_budget():
                say(f"{wl} {side} {name}: skipped (--budget-s spent)")
                continue
            if side == "zerotune":
                rec = self.zerotune_run(wl, name, args)
                zt.append(rec)
            else:
                rec = self.peer_run(wl, name, args)
                peer.append(rec)
            self.report(rec)
            line = self.summary(wl, gpus, zt, peer)
        if not zt and not peer:
            return None
        say(f"{wl}: zerotune {fmt_num(line['zerotune_tok_s_gpu'])} ({line['zerotune_variant']}), "
            f"peer default {fmt_num(line['peer_default_tok_s_gpu'])}, best {fmt_num(line['peer_best_tok_s_gpu'])} "
            f"({line['peer_best_setting']}); ratio {line['ratio_default']} / {line['ratio_best']}")
        return line


# ----------------------------------------------------------------------------- the command line
def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _named(value: str) -> tuple[str, list[str]]:
    name, sep, rest = value.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=ARGS")
    return name.strip(), shlex.split(rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="`bench.py table FILE.jsonl` prints the README table. benchmarks/README.md has more.")
    p.add_argument("--only", type=_names, default=None, metavar="W1,W2",
                   help=f"workloads (default: all but tiny): {', '.join(WORKLOADS)}")
    p.add_argument("--variants", type=_names, default=None, metavar="V1,V2",
                   help="zerotune variants to run from the table (default: all of each workload's)")
    p.add_argument("--variant", type=_named, action="append", default=[], metavar="NAME='KEY=VALUE ...'",
                   help="an extra zerotune variant for every selected workload: --set overrides, space-separated")
    p.add_argument("--peer-settings", type=_names, default=None, metavar="S1,S2",
                   help=f"peer settings to run (default: all of each workload's: {', '.join(PEER_SETTINGS)}; on the "
                        f"chat workloads also TRL's {', '.join(TRL_SETTINGS)}; 'none': no peer)")
    p.add_argument("--peer-setting", type=_named, action="append", default=[], metavar="NAME='ARGS'",
                   help="an extra peer setting: peer_hf.py arguments, e.g. 'mbs16=--mbs 16' (a trl-* NAME: "
                        "peer_trl.py's)")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="model size for every selected workload (tiny: the CPU smoke shape, fp32)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (data.max_len) for every selected workload")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the medians (default 4)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed (default 600)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new runs after this many seconds (the rest are recorded as skipped)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the workloads that use all of them (full-8b)")
    p.add_argument("--machine-gpus", type=int, default=None, help=argparse.SUPPRESS)  # tests: pretend
    p.add_argument("--work-dir", default="/tmp/zerotune-bench", help="models, data, recipes, runs, logs")
    p.add_argument("--models", default=None, help="where the random models are saved (default WORK_DIR/models)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the .jsonl files go")
    p.add_argument("--let-finish", action="store_true",
                   help="let each zerotune run end on its own (final checkpoint save) instead of stopping it "
                        "once the last step is logged")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep RUN_DIR/checkpoints of each zerotune run (deleted by default, to save disk)")
    p.add_argument("--dry-run", action="store_true", help="print every command it would run, run nothing")
    return p


def select(a) -> list[str]:
    names = a.only or [w for w, v in WORKLOADS.items() if not v.get("hidden")]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"bench.py: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if a.peer_settings == ["none"]:
        a.peer_settings = []
    if a.variants == ["none"]:
        a.variants = []
    for flag, given, known in (("--variants", a.variants, {v for t in VARIANTS.values() for v in t}),
                               ("--peer-settings", a.peer_settings,
                                {*PEER_SETTINGS, *TRL_SETTINGS, *(k for w in WORKLOADS.values() for k in w.get("peer_settings", {}))})):
        bad = sorted(set(given or []) - known)
        if bad:
            raise SystemExit(f"bench.py: {flag}: unknown {', '.join(bad)}; known: {', '.join(sorted(known))}")
    return names


def dry_run(a, plan: Plan, names: list[str], device: str) -> None:
    env = f"PYTHONPATH={plan.pkg}{os.pathsep}$PYTHONPATH"
    print(f"# device {device}, {plan.machine_gpus} GPU(s); every command runs in {REPO} with {env}")
    print(f"# zerotune is importable from {plan.pkg}/zerotune -> symlinks to {', '.join(PACKAGE_DIRS)}")
    for size in dict.fromkeys(plan.size(w) for w in names):
        print(f"$ {shlex.join([sys.executable, __file__, '_make-model', size, str(model_dir(plan.models, size))])}"
              "   # unless it exists")
    for wl in names:
        gpus, skip = plan.gpus(wl)
        if skip:
            print(f"# {wl}: skipped: {skip}")
            continue
        print(f"# {wl}: {gpus} GPU(s); recipe {plan.recipe_path(wl)} = {json.dumps(plan.recipe(wl))}")
        for name, sets in plan.variants(wl).items():
            print(f"$ {shlex.join(plan.zerotune_cmd(wl, name, sets))}   # zerotune {name}")
        for name, extra in plan.peer_settings(wl).items():
            print(f"$ {shlex.join(plan.peer_cmd(wl, extra, name))}   # peer {name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        return table_main(argv[1:])
    if argv[:1] == ["summarize"]:
        return summarize_main(argv[1:])
    if argv[:1] == ["_make-model"]:  # child: make one model
        make_model(argv[1], Path(argv[2]))
        return 0
    a = parser().parse_args(argv)
    a.variant, a.peer_setting = dict(a.variant), dict(a.peer_setting)
    if a.warmup >= a.steps:
        raise SystemExit("bench.py: --warmup must be below --steps")
    names = select(a)
    device, machine_gpus = detect_gpus()
    if a.machine_gpus is not None:
        machine_gpus = a.machine_gpus
    plan = Plan(a, machine_gpus if machine_gpus else 1)
    if a.dry_run:
        dry_run(a, plan, names, device)
        return 0
    if device == "cpu" and any(plan.dtype(w) != "fp32" for w in names):
        say("no GPU found (nvidia-smi): bf16 workloads will be slow or fail; only `tiny` is meant for CPU")
    bench = Bench(a, plan, device)
    say(f"bench: {', '.join(names)} on {device} x{machine_gpus}; results -> {bench.results_file}")
    runnable = [w for w in names if not plan.gpus(w)[1]]
    bench.prepare(runnable)
    lines = [bench.workload(wl) for wl in names]
    lines = [ln for ln in lines if ln]
    print()
    print(render_table(lines))
    say(f"bench: done in {time.time() - bench.t0:.0f}s; {bench.results_file}, {bench.runs_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
