"""A report per trained mapper: the metrics table (Markdown) and a recall@K plot (PNG), beside metrics.json."""

from __future__ import annotations

from pathlib import Path

import torch

from crossalign.align.data import PairedFeatures
from crossalign.align.mapper import JointMapper
from crossalign.align.metrics import metrics_table, retrieval_ranks

MAX_K = 50


@torch.no_grad()
def recall_curves(model: JointMapper, data: PairedFeatures, max_k: int = MAX_K) -> dict[str, list[float]]:
    """Recall@K in percent for K = 1..max_k, text -> image and image -> text."""
    model.eval()
    t2i, i2t = retrieval_ranks(model.encode_image(data.images), model.encode_text(data.captions), data.caption_image)
    ks = torch.arange(1, max_k + 1)
    return {name: (100.0 * (ranks[None, :] < ks[:, None]).float().mean(1)).tolist()
            for name, ranks in (("text → image", t2i), ("image → text", i2t))}


def write_report(directory: Path, title: str, metrics: dict[str, float], curves: dict[str, list[float]]) -> dict:
    """Write `report.md` and `recall_at_k.png` into `directory`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    directory = Path(directory)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for name, recalls in curves.items():
        axes.plot(range(1, len(recalls) + 1), recalls, label=name)
    axes.set(xlabel="K", ylabel="recall@K (%)", ylim=(0, 100), xlim=(1, len(next(iter(curves.values())))),
             title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    plot = directory / "recall_at_k.png"
    figure.savefig(plot)
    plt.close(figure)
    report = directory / "report.md"
    report.write_text(f"## {title}\n\n{metrics_table(metrics)}\n\n![recall@K]({plot.name})\n")
    return {"report": str(report), "plot": str(plot)}
