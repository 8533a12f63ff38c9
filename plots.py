"""Plots of runs, always drawn from their history (as written to history.json), never from in-memory state: a run's
loss.png and miou.png (engine, after every epoch), several runs' val mIoU per epoch (evaluate.py --runs, compare.py),
and a comparison's final mIoU per strategy (compare.py).
"""
import math
import os


def plot_history(history, out_dir):
    """loss.png and miou.png of a run, drawn from its history (as written to history.json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    for key in sorted(history[-1]):
        if key.startswith("train_loss_"):
            ax.plot(epochs, [h[key] for h in history], ".--", label=key.replace("train_loss_", "train: "))
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="val loss (weighted CE)")
    finish_plot(fig, ax, "loss", "Loss", os.path.join(out_dir, "loss.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["val_miou"] for h in history], "o-", label="val mIoU")
    ax.plot(epochs, [h["val_pixel_acc"] for h in history], "s--", label="val pixel acc")
    finish_plot(fig, ax, "%", "Validation", os.path.join(out_dir, "miou.png"))


DODGE = 0.5  # epochs: how far apart plot_runs_miou draws the first and the last run's points of one epoch


def plot_runs_miou(histories, path, groups=None):
    """Val mIoU per epoch of several runs ({label: history}) in one chart. groups ({label: group}, e.g. a strategy):
    one colour per group and a line style per run within it (its seeds), so no two groups share a colour. The runs are
    spread sideways over DODGE epochs, so runs of one epoch (or equal figures) do not hide each other."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4) if len(histories) <= 8 else (7.5, 5))
    colours, members = {}, {}
    step = DODGE / max(len(histories) - 1, 1)
    for i, (label, history) in enumerate(histories.items()):
        group = (groups or {}).get(label, label)
        colour = colours.setdefault(group, f"C{len(colours) % 10}")
        members[group] = members.get(group, -1) + 1
        shift = (i - (len(histories) - 1) / 2) * step  # runs dodged sideways: the same epoch's points side by side
        ax.plot([h["epoch"] + shift for h in history], [h["val_miou"] for h in history], color=colour, marker="o",
                markersize=3, linestyle=("-", "--", ":", "-.")[members[group] % 4], label=label)
    finish_plot(fig, ax, "val mIoU (%)", "Validation mIoU per run", path, legend_size=7)


def plot_comparison(rows, teacher_miou, path):
    """Final val mIoU per row, best first: bars at the mean over seeds with std error bars, each seed a dot, the
    teacher a dashed line (compare.py's summary.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(rows, key=lambda r: -r["miou"])
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(rows) + 2), 4.6))
    xs = range(len(rows))
    seeds = max((r["seeds"] for r in rows), default=0)
    spread = seeds > 1  # one seed has no std: no error bars
    ax.bar(xs, [r["miou"] for r in rows], yerr=[r["miou_std"] or 0.0 for r in rows] if spread else None,
           capsize=6 if spread else 0, color="tab:blue", alpha=0.7,
           label=f"student, mean +- std over {seeds} seeds" if spread else "student, 1 seed")
    for x, r in zip(xs, rows):
        ax.plot([x] * len(r["miou_runs"]), r["miou_runs"], "k.", label="one seed" if x == 0 else None)
    if teacher_miou is not None:
        ax.axhline(teacher_miou, color="tab:red", linestyle="--", label=f"teacher ({teacher_miou:.1f})")
    ax.set_xticks(list(xs), [r["model"] for r in rows], rotation=20 if len(rows) > 5 else 0, ha="right"
                  if len(rows) > 5 else "center", fontsize=8)
    ax.set(ylabel="final val mIoU (%)", title="Students after the same epochs, data and seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)  # below: no bar hidden
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish_plot(fig, ax, ylabel, title, path, legend_size=None):
    """Integer epoch ticks (a run of one or two epochs included: at least one epoch of room each side), grid, legend;
    save and close."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    first, last = ax.dataLim.intervalx
    if last - first < 2:  # matplotlib pads a run of 1 or 2 epochs by 5 %, which would get ticks at -0.04, -0.02, ...
        ax.set_xlim(math.floor(first + 0.5) - 1, math.ceil(last - 0.5) + 1)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
