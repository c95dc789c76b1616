"""benchmarks/bench.py's results: parsing zerotune's RUN_DIR/metrics.jsonl and the peer's RESULT
line, the per-workload summary line, the results .jsonl files, and the README's markdown table
(`bench.py table FILE.jsonl`).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

GIB = 2 ** 30

RESULT_KEYS = ("workload", "device", "gpus", "zerotune_tok_s_gpu", "zerotune_mfu", "zerotune_peak_gib",
               "peer_default_tok_s_gpu", "peer_best_tok_s_gpu", "peer_best_setting", "peer_best_peak_gib",
               "ratio_default", "ratio_best")


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (the results file name)."""
    s = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


# ----------------------------------------------------------------------------- reading results
def train_records(metrics_file: Path) -> tuple[list[dict], int]:
    """Train records (the last of each step) and the world size from RUN_DIR/metrics.jsonl."""
    by_step, world = {}, 1
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if rec.get("event") == "start":
            world = int(rec.get("world_size") or world)
        elif "train/tokens_per_sec" in rec and "step" in rec:
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)], world


def parse_metrics(metrics_file: Path, warmup: int) -> dict:
    """Median tokens/s per GPU and MFU over the steps after `warmup`, peak GPU memory (GiB) and
    peak host RSS of rank 0 over the whole run, and the loss of every step (bf16 and fp8 variants compare curves). train/tokens_per_sec is global (real tokens of all ranks); memory
    is train/gpu_mem_peak_gib (GiB), or the older train/gpu_mem_peak_gb (1e9-byte GB) converted."""
    recs, world = train_records(metrics_file)
    timed = [r for r in recs if r["step"] > warmup]
    if not timed:
        raise ValueError(f"{metrics_file}: no train steps after the {warmup} warm-up steps "
                         f"({len(recs)} train records)")
    tps = [r["train/tokens_per_sec"] / world for r in timed]
    mfus = [r["train/mfu"] for r in timed if r.get("train/mfu") is not None]
    peaks = [r["train/gpu_mem_peak_gib"] if r.get("train/gpu_mem_peak_gib") is not None
             else r.get("train/gpu_mem_peak_gb") and r["train/gpu_mem_peak_gb"] * 1e9 / GIB  # runs before 2026-12: GB
             for r in recs]
    peaks = [p for p in peaks if p is not None]
    secs = [r.get("time/step_s") for r in timed]
    mean = (sum(t * s for t, s in zip(tps, secs)) / sum(secs)) if all(secs) else None
    eff = [r["data/packing_efficiency"] for r in timed if r.get("data/packing_efficiency") is not None]
    rss = [r["train/host_rss_peak_gib"] for r in recs if r.get("train/host_rss_peak_gib") is not None]
    return {"tok_s_gpu": round(statistics.median(tps)), "tok_s_gpu_mean": round(mean) if mean else None,
            "mfu": round(statistics.median(mfus), 4) if mfus else None,
            "peak_gib": round(max(peaks), 2) if peaks else None,
            "host_rss_peak_gib": round(max(rss), 2) if rss else None,   # rank 0's process (runs since 2026-12-06)
            "step_s": round(statistics.median(secs), 4) if all(secs) else None,
            "packing_efficiency": round(statistics.median(eff), 4) if eff else None,
            "world": world, "timed_steps": len(timed), "last_step": recs[-1]["step"] if recs else 0,
            "losses": [r.get("train/loss") for r in recs]}   # every step's train loss, from step 1: the curve


def parse_peer(log: Path) -> dict | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        i = line.find("RESULT {")
        if i >= 0:
            return json.loads(line[i + 7:])
    return None


def last_step(metrics_file: Path) -> int:
    try:
        recs, _ = train_records(metrics_file)
    except OSError:
        return 0
    return recs[-1]["step"] if recs else 0


# ----------------------------------------------------------------------------- one workload
def best_of(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if r.get("ok")]
    return max(ok, key=lambda r: r["tok_s_gpu"]) if ok else None


def summarize(wl: str, device: str, gpus: int, zt: list[dict], peer: list[dict], meta: dict) -> dict:
    best = best_of(zt)
    pbest = best_of(peer)
    pdef = next((r for r in peer if r["name"] == "default" and r.get("ok")), None)
    zdef = next((r for r in zt if r["name"] == "default" and r.get("ok")), None)
    ratio = lambda a, b: round(a["tok_s_gpu"] / b["tok_s_gpu"], 3) if a and b else None  # noqa: E731
    brief = lambda r: ({k: r.get(k) for k in ("tok_s_gpu", "mfu", "peak_gib")} if r.get("ok")  # noqa: E731
                       else {"error": r.get("error_kind"), "tail": (r.get("error") or "")[-300:]})
    return {
        "workload": wl, "device": device, "gpus": gpus,
        "zerotune_tok_s_gpu": best and best["tok_s_gpu"], "zerotune_mfu": best and best["mfu"],
        "zerotune_peak_gib": best and best["peak_gib"],
        "peer_default_tok_s_gpu": pdef and pdef["tok_s_gpu"],
        "peer_best_tok_s_gpu": pbest and pbest["tok_s_gpu"], "peer_best_setting": pbest and pbest["name"],
        "peer_best_peak_gib": pbest and pbest["peak_gib"],
        "ratio_default": ratio(best, pdef), "ratio_best": ratio(best, pbest),
        # extras
        "zerotune_variant": best and best["name"], "zerotune_default_tok_s_gpu": zdef and zdef["tok_s_gpu"],
        "zerotune_default_peak_gib": zdef and zdef["peak_gib"],
        "peer_default_mfu": pdef and pdef["mfu"], "peer_default_peak_gib": pdef and pdef["peak_gib"],
        "peer_best_mfu": pbest and pbest["mfu"],
        "zerotune_variants": {r["name"]: brief(r) for r in zt},
        "peer_settings": {r["name"]: brief(r) for r in peer},
        **trl_best(best, peer, ratio),
        **meta,
    }


def trl_best(best: dict | None, peer: list[dict], ratio) -> dict:
    """TRL's SFTTrainer (settings named trl-*) on its own, when it ran: its fastest setting and zerotune's ratio."""
    trl = [r for r in peer if r["name"].startswith("trl-")]
    if not trl:
        return {}
    t = best_of(trl)
    return {"peer_trl_best_tok_s_gpu": t and t["tok_s_gpu"], "peer_trl_best_setting": t and t["name"],
            "peer_trl_best_peak_gib": t and t["peak_gib"], "ratio_best_trl": ratio(best, t)}


def merge_results(path: Path, lines: list[dict]) -> None:
    """Write `lines` into `path`, replacing earlier lines of the same workloads."""
    old = []
    if path.is_file():
        old = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    new = {d["workload"]: d for d in lines}
    out = [new.pop(d["workload"]) if d["workload"] in new else d for d in old] + list(new.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(d) + "\n" for d in out))
    tmp.replace(path)


# ----------------------------------------------------------------------------- the table
def fmt_num(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


def fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_gib(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_table(lines: list[dict]) -> str:
    """The README table (markdown) from a results .jsonl."""
    head = ["workload", "GPUs", "zerotune tok/s/GPU (variant)", "MFU", "peak GiB", "peer default tok/s/GPU",
            "peer best tok/s/GPU (setting)", "peer best peak GiB", "vs default", "vs best"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    devices = sorted({d.get("device", "?") for d in lines})
    for d in lines:
        zt = fmt_num(d.get("zerotune_tok_s_gpu"))
        if d.get("zerotune_tok_s_gpu") is None:
            errs = {v.get("error") for v in (d.get("zerotune_variants") or {}).values()} - {None}
            zt = "failed" + (f" ({', '.join(sorted(errs))})" if errs else "")
        elif d.get("zerotune_variant"):
            zt += f" ({d['zerotune_variant']})"
        pb = fmt_num(d.get("peer_best_tok_s_gpu"))
        if d.get("peer_best_setting"):
            pb += f" ({d['peer_best_setting']})"
        out.append("| " + " | ".join([d["workload"], str(d.get("gpus", "-")), zt, fmt_pct(d.get("zerotune_mfu")),
                                      fmt_gib(d.get("zerotune_peak_gib")), fmt_num(d.get("peer_default_tok_s_gpu")),
                                      pb, fmt_gib(d.get("peer_best_peak_gib")), fmt_ratio(d.get("ratio_default")),
                                      fmt_ratio(d.get("ratio_best"))]) + " |")
    out.append("")
    out.append(f"Device: {', '.join(devices)}. tok/s/GPU: median over the steps after the warm-up, real "
               "(non-padding) tokens; ratio = zerotune's best variant over the peer's default / best setting.")
    return "\n".join(out)


def summarize_main(argv: list[str]) -> int:
    """Per-run lines of ONE device call (several parallel jobs' -runs.jsonl files are one call) ->
    one result line per workload, merged into --out. Only runs of the same call are compared."""
    p = argparse.ArgumentParser(prog="bench.py summarize", description=summarize_main.__doc__)
    p.add_argument("runs", type=Path, nargs="+", help="-runs.jsonl files of one call")
    p.add_argument("--out", type=Path, required=True, help="the results .jsonl to merge into")
    p.add_argument("--call", default="", help="a label of the call, kept in each line")
    a = p.parse_args(argv)
    runs = [json.loads(ln) for f in a.runs for ln in f.read_text().splitlines() if ln.strip()]
    lines = []
    for wl in dict.fromkeys(r["workload"] for r in runs):
        mine = [r for r in runs if r["workload"] == wl]
        device = next((r["device"] for r in mine if r.get("device")), "?")
        gpus = max(r.get("world") or 1 for r in mine)
        lines.append(summarize(wl, device, gpus, [r for r in mine if r["side"] == "zerotune"],
                               [r for r in mine if r["side"] == "peer"], {"call": a.call}))
    merge_results(a.out, lines)
    print(render_table([json.loads(ln) for ln in a.out.read_text().splitlines() if ln.strip()]))
    return 0


def table_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.py table", description="print the README table from a results .jsonl")
    p.add_argument("file", type=Path)
    a = p.parse_args(argv)
    lines = [json.loads(ln) for ln in a.file.read_text().splitlines() if ln.strip()]
    print(render_table([d for d in lines if "workload" in d]))   # a call's file may hold its checks' rows too
    return 0
