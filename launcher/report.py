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
        raise FileNotFoundError(f"{tb}: no TensorBoard event files (logging.report_to without tensorboard?)")
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


MEMORY = (("train/gpu_mem_allocated_gib", "-", "allocated"), ("train/gpu_mem_reserved_gib", "--", "reserved"),
          ("train/gpu_mem_peak_gib", ":", "peak"))
TIME_SPLIT = (("time/fwd_bwd_s", "-", "forward+backward"), ("time/optimizer_s", "--", "optimizer"),
              ("time/data_wait_s", ":", "data wait"), ("time/other_s", "-.", "other"))


def _plot_run(ax: dict, s: dict, color: str, label: str, many: bool, has_mem: bool) -> None:
    """One run's curves on the four panels (ax: loss, lr, tps, mfu or None, mem)."""
    name = f"{label}: " if many else ""
    if "train/loss" in s:
        x, y = s["train/loss"]
        ax["loss"].plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax["loss"].plot(x, smooth(y), color=color, label=f"{name}train (smoothed)")
    if "eval/loss" in s:
        ax["loss"].plot(*s["eval/loss"], "o--", color=color, markersize=4, label=f"{name}eval")
    if "train/lr" in s:
        ax["lr"].plot(*s["train/lr"], color=color, label=label if many else None)
    if "train/tokens_per_sec" in s:
        ax["tps"].plot(*s["train/tokens_per_sec"], color=color, label=f"{name}tokens/s")
    if ax["mfu"] is not None and "train/mfu" in s:
        x, y = s["train/mfu"]
        ax["mfu"].plot(x, [100 * v for v in y], ":", color=color, label=f"{name}MFU")
    for tag, style, what in (MEMORY if has_mem else TIME_SPLIT):  # a CPU run: where the step time goes
        if tag in s:
            ax["mem"].plot(*s[tag], style, color=color, label=f"{name}{what}")


def _label(ax: dict, has_mem: bool) -> None:
    ax["loss"].set(title="loss", xlabel="step", ylabel="loss")
    ax["lr"].set(title="learning rate", xlabel="step", ylabel="lr")
    ax["tps"].set(title="throughput (real tokens, all GPUs)" + (" and MFU" if ax["mfu"] else ""), xlabel="step",
                  ylabel="tokens/s")
    if ax["mfu"] is not None:
        ax["mfu"].set_ylabel("MFU %")
    if has_mem:
        ax["mem"].set(title="GPU memory (rank 0)", xlabel="step", ylabel="GiB")
    else:
        ax["mem"].set(title="step time split (no GPU memory recorded)", xlabel="step", ylabel="seconds")
    for key in ("loss", "lr", "tps", "mem"):
        ax[key].grid(alpha=0.3)
        handles, labels = ax[key].get_legend_handles_labels()
        if key == "tps" and ax["mfu"] is not None:
            h2, l2 = ax["mfu"].get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax[key].legend(handles, labels, fontsize=8)


def draw(runs: dict[str, dict], out: Path) -> Path:
    """runs: label -> scalars (from read_scalars). Writes a 2x2 figure to `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (ax_loss, ax_lr), (ax_tps, ax_mem) = axes
    has_mfu = any("train/mfu" in s for s in runs.values())
    has_mem = any("train/gpu_mem_allocated_gib" in s for s in runs.values())
    ax = {"loss": ax_loss, "lr": ax_lr, "tps": ax_tps, "mem": ax_mem, "mfu": ax_tps.twinx() if has_mfu else None}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, s) in enumerate(runs.items()):
        _plot_run(ax, s, colors[i % len(colors)], label, len(runs) > 1, has_mem)
    _label(ax, has_mem)
    fig.suptitle(" vs ".join(runs) if len(runs) > 1 else f"zerotune run: {next(iter(runs))}")
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
