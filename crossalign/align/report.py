"""A report per trained mapper: the metrics table (Markdown) and a recall@K plot (PNG), beside its metrics.

Also the readers that turn a saved report into pictures a person can look at (PNG bytes, `data:` URLs);
the library never knows where they are shown.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from crossalign.align.mapper_dir import MapperDir
from crossalign.align.metrics import metrics_table, retrieval_ranks
from crossalign.align.querybank import PairKeys, QueryBank

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_K = 50
# 600 x 400 pixels: a line plot of a few tens of KB, small enough to inline as a data: URL.
PLOT_SIZE_INCHES = (6, 4)
PLOT_DPI = 100


@torch.no_grad()
def recall_curves(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                  bank: QueryBank | None = None, method: str = "none", image_ids: Sequence[str] | None = None,
                  max_k: int = MAX_K) -> dict[str, list[float]]:
    """Recall@K in percent for K = 1..max_k, text -> image and image -> text, scored under `method`
    (`image_ids` as in `crossalign.align.metrics.normalised_metrics`)."""
    norms = {}
    if bank is not None and method != "none":
        caption_keys = None if image_ids is None else PairKeys(image_ids, caption_image)
        norms = {"image_norm": bank.gallery_norm(method, image_emb, "image", image_ids),
                 "text_norm": bank.gallery_norm(method, text_emb, "text", caption_keys)}
    t2i, i2t = retrieval_ranks(image_emb, text_emb, caption_image, **norms)
    ks = torch.arange(1, max_k + 1)
    return {name: (100.0 * (ranks[None, :] < ks[:, None]).float().mean(1)).tolist()
            for name, ranks in (("text → image", t2i), ("image → text", i2t))}


def _figure() -> Figure:
    # The object API, not pyplot: no global figure state, so tasks drawing in threads do not collide.
    from matplotlib.figure import Figure

    return Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)


def write_report(directory: MapperDir, title: str, metrics: dict[str, float], curves: dict[str, list[float]]) -> dict:
    """Write the mapper's report (Markdown) and recall@K plot (PNG) into its directory; returns their paths."""
    figure = _figure()
    axes = figure.subplots()
    for name, recalls in curves.items():
        axes.plot(range(1, len(recalls) + 1), recalls, label=name)
    axes.set(xlabel="K", ylabel="recall@K (%)", ylim=(0, 100), xlim=(1, len(next(iter(curves.values())))),
             title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    plot = directory.recall_plot_path
    figure.savefig(plot, format="png")
    report = directory.report_path
    report.write_text(f"## {title}\n\n{metrics_table(metrics)}\n\n![recall@K]({plot.name})\n")
    return {"report": str(report), "plot": str(plot)}


def plot_training_curve(history: list[dict[str, float]], title: str) -> bytes:
    """A PNG of a training curve: running loss (left axis) and dev rsum (right axis) against the step.

    Args:
        history: rows of {step, loss, dev_rsum[, head]}, as `fit_mapper` records them; must not be empty.
        title: the plot's title.

    Raises:
        ValueError: `history` is empty (a closed-form mapper has no curve).
    """
    if not history:
        raise ValueError("no training history to plot")
    figure = _figure()
    loss_axes = figure.subplots()
    loss_axes.set(xlabel="step", ylabel="training loss", title=title)
    loss_axes.grid(alpha=0.3)
    rsum_axes = loss_axes.twinx()
    # an ensemble mapper (several heads, trained one after the other) has one curve per head
    for head in sorted({row.get("head", 0) for row in history}):
        rows = [row for row in history if row.get("head", 0) == head]
        steps = [row["step"] for row in rows]
        style = ["-", "--", ":", "-."][head % 4]
        loss_line, = loss_axes.plot(steps, [row["loss"] for row in rows], color="C0", linestyle=style,
                                    label="training loss")
        rsum_line, = rsum_axes.plot(steps, [row["dev_rsum"] for row in rows], color="C1", linestyle=style,
                                    marker=".", label="dev rsum")
    rsum_axes.set(ylabel="dev rsum", ylim=(0, 600))  # rsum sums six recalls in percent
    # below the axes: a legend inside would hide part of one curve or the other
    figure.legend(handles=[loss_line, rsum_line], loc="lower center", ncols=2, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return png.getvalue()


def png_data_url(png: bytes) -> str:
    """`png` as a `data:image/png;base64,...` URL, to show a plot where only a URL fits (Markdown, HTML)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass
class SavedReport:
    """What `fit_mapper` saved beside a mapper: where it was selected, its training curve and recall@K plot."""

    mapper_id: str
    corpus: str
    split: str
    history: list[dict[str, float]]
    recall_plot: Path | None  # None for a mapper saved before plots were written

    @property
    def title(self) -> str:
        return f"{self.mapper_id} on {self.corpus}:{self.split}"


def read_report(mapper_dir: MapperDir) -> SavedReport:
    """Read the report saved in `mapper_dir` (its metrics and, when present, its recall@K plot).

    Raises:
        FileNotFoundError: `mapper_dir` holds no metrics, i.e. no trained mapper.
    """
    saved = mapper_dir.metrics()
    plot = mapper_dir.recall_plot_path
    return SavedReport(mapper_id=mapper_dir.id, corpus=saved.get("corpus", ""), split=saved.get("split", ""),
                       history=saved.get("history", []), recall_plot=plot if plot.exists() else None)
