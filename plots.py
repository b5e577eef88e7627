"""Plots: PNG files only, no window; one panel per quantity, every curve labelled."""

from files import replaced


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, **savefig):
    """fig as the PNG path, written whole."""
    with replaced(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    pyplot().close(fig)
    return path


def plot_curves(path, xlabel, panels):
    """panels: {ylabel: {curve label: (xs, ys)}} -> a PNG with the panels side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=label, marker="o", markersize=3)  # markers: a single point shows too
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_history(history, path):
    """The losses (and accuracies, where a script measures them) of each evaluation, against tokens seen."""
    tokens = history["tokens"]
    panels = {"loss": {"train": (tokens, history["train"]), "validation": (tokens, history["val"])}}
    if "val_accuracy" in history:
        panels["accuracy"] = {"train": (tokens, history["train_accuracy"]),
                              "validation": (tokens, history["val_accuracy"])}
    return plot_curves(path, "tokens seen", panels)
