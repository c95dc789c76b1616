"""`zerotune report RUN_DIR`: a PNG of a run's curves, read back from its TensorBoard event
files: loss and eval loss, learning rate, tokens/s and MFU, GPU memory (or, on a CPU run, where
the step time goes). `--compare RUN_A RUN_B ...` draws several runs on one figure.
"""
from __future__ import annotations

from pathlib import Path

from zerotune.core.layout import TENSORBOARD_DIR

HELP = "draw a run's loss, learning rate, throughput and memory curves to a PNG"
DESCRIPTION = ("Read RUN_DIR/tensorboard and draw loss + eval loss, learning rate, tokens/s + MFU and\n"
               "GPU memory into one PNG (headless; no display needed).\n\n"
               "  zerotune report runs/demo                      # writes runs/demo/report.png\n"
               "  zerotune report runs/demo --out loss.png\n"
               "  zerotune report --compare runs/a runs/b --out a_vs_b.png")


def add_arguments(p) -> None:
    p.add_argument("run_dir", nargs="?", help="the run folder (output_dir/name)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/report.png, or compare.png with --compare)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="draw these runs on one figure")


def read_scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """tag -> (steps, values) from RUN_DIR/tensorboard, one value per step (the last written)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = Path(run_dir) / TENSORBOARD_DIR
    if not tb.is_dir() or not any(tb.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{tb}: no TensorBoard event files (was logging.tensorboard off?)")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = sorted(by_step)
        out[tag] = (steps, [by_step[s] for s in steps])
    return out


def smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~4% of the points (no lag, unlike an EMA started at step 1)."""
    half = len(values) // 50
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def draw(runs: dict[str, dict], out: Path) -> Path:
    """runs: label -> scalars (from read_scalars). Writes a 2x2 figure to `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (ax_loss, ax_lr), (ax_tps, ax_mem) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(runs) > 1
    has_mfu = any("train/mfu" in s for s in runs.values())
    has_mem = any("train/gpu_mem_allocated_gb" in s for s in runs.values())
    ax_mfu = ax_tps.twinx() if has_mfu else None

    for i, (label, s) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        name = f"{label}: " if many else ""
        if "train/loss" in s:
            x, y = s["train/loss"]
            ax_loss.plot(x, y, color=c, alpha=0.25, linewidth=0.8)
            ax_loss.plot(x, smooth(y), color=c, label=f"{name}train (smoothed)")
        if "eval/loss" in s:
            x, y = s["eval/loss"]
            ax_loss.plot(x, y, "o--", color=c, markersize=4, label=f"{name}eval")
        if "train/lr" in s:
            ax_lr.plot(*s["train/lr"], color=c, label=label if many else None)
        if "train/tokens_per_sec" in s:
            ax_tps.plot(*s["train/tokens_per_sec"], color=c, label=f"{name}tokens/s")
        if ax_mfu is not None and "train/mfu" in s:
            x, y = s["train/mfu"]
            ax_mfu.plot(x, [100 * v for v in y], ":", color=c, label=f"{name}MFU")
        if has_mem:
            for tag, style, what in (("train/gpu_mem_allocated_gb", "-", "allocated"),
                                     ("train/gpu_mem_reserved_gb", "--", "reserved"),
                                     ("train/gpu_mem_peak_gb", ":", "peak")):
                if tag in s:
                    ax_mem.plot(*s[tag], style, color=c, label=f"{name}{what}")
        else:  # a CPU run: where the step time goes
            for tag, style, what in (("time/fwd_bwd_s", "-", "forward+backward"), ("time/optimizer_s", "--", "optimizer"),
                                     ("time/data_wait_s", ":", "data wait")):
                if tag in s:
                    ax_mem.plot(*s[tag], style, color=c, label=f"{name}{what}")

    ax_loss.set(title="loss", xlabel="step", ylabel="loss")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    ax_tps.set(title="throughput (real tokens, all GPUs)" + (" and MFU" if has_mfu else ""), xlabel="step",
               ylabel="tokens/s")
    if ax_mfu is not None:
        ax_mfu.set_ylabel("MFU %")
    if has_mem:
        ax_mem.set(title="GPU memory (rank 0)", xlabel="step", ylabel="GB")
    else:
        ax_mem.set(title="step time split (no GPU memory recorded)", xlabel="step", ylabel="seconds")
    for ax in (ax_loss, ax_lr, ax_tps, ax_mem):
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if ax is ax_tps and ax_mfu is not None:
            h2, l2 = ax_mfu.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax.legend(handles, labels, fontsize=8)
    fig.suptitle(" vs ".join(runs) if many else f"zerotune run: {next(iter(runs))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(args) -> int:
    from zerotune.core.recipe import RecipeError
    if args.compare and args.run_dir:
        raise RecipeError("give RUN_DIR or --compare RUN_A RUN_B, not both")
    dirs = [Path(d) for d in (args.compare or ([args.run_dir] if args.run_dir else []))]
    if not dirs:
        raise RecipeError("give RUN_DIR, or --compare RUN_A RUN_B")
    labels = [d.name for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [str(d) for d in dirs]
    runs = {label: read_scalars(d) for label, d in zip(labels, dirs)}
    out = Path(args.out) if args.out else (Path("compare.png") if args.compare else dirs[0] / "report.png")
    print(f"zerotune: wrote {draw(runs, out)}")
    return 0
