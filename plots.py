"""Plots of runs, always drawn from their history (as written to history.json), never from in-memory state: a run's
loss.png and miou.png (engine, after every epoch), and several runs' val mIoU per epoch (evaluate.py --runs, demo.py).
"""
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


def plot_runs_miou(histories, path):
    """Val mIoU per epoch of several runs ({label: history}) in one chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in histories.items():
        ax.plot([h["epoch"] for h in history], [h["val_miou"] for h in history], "o-", label=label)
    finish_plot(fig, ax, "val mIoU (%)", "Validation mIoU per run", path, legend_size=7)


def finish_plot(fig, ax, ylabel, title, path, legend_size=None):
    """Integer epoch ticks (a run of one or two epochs included: at least one epoch of room each side), grid, legend;
    save and close."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    low, high = ax.get_xlim()
    if high - low < 2:  # matplotlib pads a single epoch by +-0.05, which would get ticks at -0.04, -0.02, ...
        middle = round((low + high) / 2)
        ax.set_xlim(middle - 1, middle + 1)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
