"""Draw the experiments' PNGs from their JSON results (experiments/results -> experiments/plots).

    python experiments/plots.py

Plots: sudden convergence (IoU vs steps of the shipped run), the ablation (IoU vs steps of all runs, and final
IoU with and without prompts), training cost (time and memory relative to full fine-tuning), the base model's loss.
A missing result file skips its plot.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
from common import PLOTS, RESULTS, read_json

LABELS = {"zero50": "zero convs, 50% empty prompts (paper)", "random50": "ordinary random convs, 50% empty prompts",
          "zero0": "zero convs, no empty prompts"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def sudden_convergence(results: Path, plots: Path) -> Path | None:
    f = results / "controlnet_zero50.json"
    if not f.is_file():
        return None
    r = read_json(f)
    plt = _plt()
    steps, iou = zip(*r["curve"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, iou, "o-", color="tab:blue", label="base + ControlNet")
    ax.axhline(r["curve"][0][1], color="gray", ls="--", label="base model alone (step 0)")
    ax.set_xlabel("training step")
    ax.set_ylabel("controllability (mean IoU)")
    ax.set_ylim(0, 1)
    ax.set_title("Sudden convergence (toy world)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, plots / "sudden_convergence.png")


def ablation(results: Path, plots: Path) -> Path | None:
    runs = {v: read_json(results / f"controlnet_{v}.json") for v in LABELS if (results / f"controlnet_{v}.json").is_file()}
    if not runs:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for v, r in runs.items():
        steps, iou = zip(*r["curve"])
        a1.plot(steps, iou, "o-", ms=3, label=LABELS[v])
    a1.set_xlabel("training step")
    a1.set_ylabel("mean IoU (with prompts)")
    a1.set_ylim(0, 1)
    a1.grid(alpha=0.3)
    a1.legend(loc="lower right", fontsize=8)
    names = list(runs)
    x = range(len(names))
    a2.bar([i - 0.2 for i in x], [runs[v]["iou_with_prompts"] for v in names], 0.4, label="with prompts")
    a2.bar([i + 0.2 for i in x], [runs[v]["iou_without_prompts"] for v in names], 0.4, label='prompts ""')
    a2.set_xticks(list(x), [f"{v}\n({runs[v]['steps']} steps)" for v in names], fontsize=8)
    a2.set_ylim(0, 1)
    a2.set_ylabel("final mean IoU")
    a2.legend(fontsize=8)
    fig.suptitle("Ablation: zero convs vs ordinary convs, 50% vs 0% empty prompts")
    return _save(fig, plots / "ablation.png")


def training_cost(results: Path, plots: Path) -> Path | None:
    f = results / "training_cost.json"
    if not f.is_file():
        return None
    summary = read_json(f)["summary"]
    plt = _plt()
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 3.6), squeeze=False)
    for ax, (model, modes) in zip(axes[0], summary.items()):
        names = list(modes)
        x = range(len(names))
        ax.bar([i - 0.27 for i in x], [modes[m]["time_vs_full"] for m in names], 0.27, label="step time")
        ax.bar([i for i in x], [modes[m]["tensor_memory_vs_full"] for m in names], 0.27, label="tensor memory")
        ax.bar([i + 0.27 for i in x], [modes[m]["rss_vs_full"] for m in names], 0.27, label="peak RSS delta")
        ax.axhline(1.0, color="gray", ls="--")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("relative to full fine-tuning")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Training cost on a CPU, same batch")
    return _save(fig, plots / "training_cost.png")


def base_loss(results: Path, plots: Path) -> Path | None:
    f = results / "base.json"
    if not f.is_file():
        return None
    losses = read_json(f)["losses"]
    plt = _plt()
    w = max(1, len(losses) // 50)
    smooth = [sum(losses[i:i + w]) / len(losses[i:i + w]) for i in range(0, len(losses), w)]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([i * w for i in range(len(smooth))], smooth)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"v-prediction loss (mean of {w})")
    ax.set_title("Toy base model, trained from scratch by the Trainer's base mode")
    ax.grid(alpha=0.3)
    return _save(fig, plots / "base_loss.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def draw_all(results: Path = RESULTS, plots: Path = PLOTS) -> list[Path]:
    made = [p for p in (f(results, plots) for f in (sudden_convergence, ablation, training_cost, base_loss)) if p]
    for p in made:
        print(f"wrote {p}", flush=True)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plots", type=Path, default=PLOTS)
    a = ap.parse_args()
    draw_all(a.results, a.plots)


if __name__ == "__main__":
    main()
