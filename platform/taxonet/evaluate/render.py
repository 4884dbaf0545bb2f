"""An evaluation report as files: report.md (Markdown), metrics.json, unseen.csv, and matplotlib plots of the
confusion matrices (``confusion_<rank>.png``) and the training curves (``curves.png``).

Plots use matplotlib's Agg canvas (no display, no global pyplot state). Files are written whole under a temporary
name and renamed, so a reader never sees half a report file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from taxonet.evaluate.report import UNSURE, EvaluationReport, UnseenClassResult, UnseenReport
from taxonet.metrics import MISSING, TABLE_METRICS
from taxonet.taxonomy import Taxonomy

_SCORE_LABELS = {"max_logit": "max logit (the paper's score)", "max_softmax": "max softmax probability",
                 "energy": "energy (negative free energy)"}


# ---------------------------------------------------------------------------------------------------------- files
#: one phrase per anomaly.chain_rule, for the report
CHAIN_RULE_TEXT = {"strict": "a predicted chain that breaks the taxonomy is unsure at every rank, as the authors",
                   "lenient": "ranks above a broken link of the predicted chain stay reliable, taxonet's variant"}


def write_report(report: EvaluationReport, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, metrics.json, confusion_<rank>.png, curves.png (when there is a history) and, with an
    unseen dataset, unseen.csv into ``out_dir`` (a local directory, created). Returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for rank, matrix in report.confusion.items():
        path = out / f"confusion_{_file_safe(rank)}.png"
        plot_confusion(matrix, report.taxonomy.names[report.taxonomy.level(rank)], path,
                       title=f"{rank}: {report.model_name} on {report.split} ({int(matrix.sum())} images)")
        files[f"confusion_{rank}"] = path
    curves = out / "curves.png"
    if plot_curves(report.history, report.ranks, curves, title=f"training: {report.model_name}"):
        files["curves"] = curves
    else:
        curves.unlink(missing_ok=True)  # a stale plot from an earlier report must not pass for this one
    if report.unseen is not None:
        files["unseen"] = out / "unseen.csv"
        _write_text(files["unseen"], _unseen_csv(report.unseen, report.taxonomy))
    files["metrics"] = out / "metrics.json"
    _write_text(files["metrics"], json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=True))
    files["report"] = out / "report.md"
    _write_text(files["report"], markdown(report, files))
    return files


def table4_markdown(report: EvaluationReport, digits: int = 3) -> str:
    """One row in the shape of the paper's Table 4: per rank macro P/R/F1 ("–" for ranks without a head)."""
    header = ["model"] + [f"{rank} {abbrev}" for rank in report.ranks for _, abbrev in TABLE_METRICS]
    cells = [report.model_name]
    for rank in report.ranks:
        values = report.rank_metrics.get(rank)
        for metric, _ in TABLE_METRICS:
            cells.append(MISSING if values is None else _number(values[metric], digits))
    return _markdown_table(header, [cells], align_first_left=True)


def markdown(report: EvaluationReport, files: Mapping[str, Path] | None = None) -> str:
    """report.md; ``files`` (from :func:`write_report`) decides which images are linked."""
    files = files or {}
    lines = [f"# Evaluation: {report.model_name}", ""]
    lines += [f"- checkpoint: `{report.checkpoint}`", f"- dataset: `{report.dataset}`, split `{report.split}`, "
              f"{report.images} images", f"- heads: {', '.join(report.head_ranks)} (ranks: {', '.join(report.ranks)})"]
    lines.append(f"- anomaly thresholds: τ = μ − {report.threshold_k:g}·σ per (rank, class); chain rule "
                 f"{report.chain_rule} ({CHAIN_RULE_TEXT.get(str(report.chain_rule), '')})" if report.threshold_k
                 is not None else "- anomaly thresholds: none in this checkpoint (no reliability analysis)")
    lines += ["", "## Per-rank metrics (Table 4 shape: macro precision, recall, F1)", "", table4_markdown(report),
              ""]
    rows = []
    for rank in report.ranks:
        derived = rank not in report.rank_metrics
        values = report.derived_metrics.get(rank) if derived else report.rank_metrics[rank]
        if values is None:
            continue
        flagged = report.flagged.get(rank) if report.flagged else None
        rows.append([rank + (" (derived from the taxonomy)" if derived else ""),
                     *(_number(values[m]) for m in ("precision", "recall", "f1", "accuracy")),
                     str(values["support"]), MISSING if flagged is None else _percent(flagged)])
    lines += [_markdown_table(["rank", "precision", "recall", "F1", "accuracy", "labelled images",
                               "score below τ"], rows, align_first_left=True), ""]
    lines.append(f"Hierarchy consistency: {_percent(report.consistency)} of the predicted chains follow the taxonomy"
                 + (" (single-task: higher ranks are derived, so always consistent)."
                    if len(report.head_ranks) < len(report.ranks) else "."))
    lines.append("")
    if report.lowest_reliable is not None:
        lines += ["## Lowest reliable rank", "",
                  "Down to which rank each prediction can be trusted (METHOD.md: a rank is reliable when it and "
                  "the rank above pass their anomaly thresholds and the chain follows the taxonomy).", ""]
        rows = []
        for key in [*reversed(report.ranks), UNSURE]:
            correct = (report.reliable_correct or {}).get(key)
            rows.append([key, _percent(report.lowest_reliable.get(key, 0.0)),
                         MISSING if correct is None or math.isnan(correct) else _percent(correct)])
        lines += [_markdown_table(["lowest reliable rank", "share of images", "label correct at that rank"],
                                  rows, align_first_left=True), ""]
    lines += ["## Confusion matrices", "",
              f"Rows: true class; columns: predicted class; last column \"{UNSURE}\": not reported at that rank "
              "(its lowest reliable rank is higher, or none).", ""]
    for rank in report.ranks:
        key = f"confusion_{rank}"
        if key in files:
            lines += [f"![{rank} confusion matrix]({Path(files[key]).name})", ""]
    lines += ["## Training curves", ""]
    if "curves" in files:
        lines += [f"![training curves]({Path(files['curves']).name})", ""]
    else:
        lines += ["No per-epoch history in this checkpoint: no curves.", ""]
    if report.unseen is not None:
        lines += _unseen_markdown(report.unseen, report.taxonomy)
    if report.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    return "\n".join(lines)

# ------------------------------------------------------------------ files

# ---------------------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # draw with Agg: no display, no global pyplot state
    return figure


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A confusion matrix [n, n+1] as PNG: colour = share of the row, numbers = counts, last column "unsure"."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n + 1):
        raise ValueError(f"confusion matrix must be [{n}, {n + 1}] for {n} classes, got {matrix.shape}")
    columns = [*class_names, UNSURE]
    cell = 0.55 if n <= 20 else max(0.25, 11.0 / n)  # inches per cell (100 dpi): labels stay legible
    font = 9 if n <= 20 else max(6, int(180 / n))
    width, height = (n + 1) * cell, n * cell
    # the matrix fills the canvas; tick labels, title and colour bar lie outside and are kept by the tight bbox
    figure = _figure(width + 0.6, height)
    axes = figure.add_axes((0.0, 0.0, width / (width + 0.6), 1.0))
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(n + 1))
    axes.set_xticklabels(columns, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
    axes.set_yticks(range(n))
    axes.set_yticklabels([f"{name} ({int(total)})" for name, total in zip(class_names, rows[:, 0])], fontsize=font)
    axes.axvline(n - 0.5, color="black", linewidth=1.5)  # sets the "unsure" column apart
    axes.get_xticklabels()[-1].set_fontweight("bold")
    if n <= 30:
        for i in range(n):
            for j in range(n + 1):
                if matrix[i, j]:
                    axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=font,
                              color="white" if shares[i, j] > 0.6 else "black")
    axes.set_xlabel("predicted", fontsize=max(font + 1, 9))
    axes.set_ylabel("true (images)", fontsize=max(font + 1, 9))
    axes.set_title(title, fontsize=max(font + 2, 10))
    colorbar_axes = figure.add_axes(((width + 0.25) / (width + 0.6), 0.0, 0.15 / (width + 0.6), 1.0))
    figure.colorbar(image, cax=colorbar_axes).set_label("share of the row", fontsize=max(font, 8))
    path = Path(path)
    figure.savefig(path, format="png", bbox_inches="tight", pad_inches=0.2)
    return path


def plot_curves(history: Sequence[Mapping[str, object]], ranks: Sequence[str], path: str | Path,
                title: str = "") -> bool:
    """Loss (train, val) and per-rank validation F1 per epoch as PNG; False (nothing written) without history."""
    epochs = [h for h in history if isinstance(h, Mapping) and "epoch" in h]
    if not epochs:
        return False
    epochs = sorted(epochs, key=lambda h: h["epoch"])
    x = [int(h["epoch"]) + 1 for h in epochs]  # 1-based for people
    figure = _figure(11, 4.2)
    loss_axes, f1_axes = figure.subplots(1, 2)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        series = _series(epochs, key)
        if series is not None:
            loss_axes.plot(x, series, marker="o", label=label)
    val_loss = _series(epochs, "val_loss")
    if val_loss is not None and np.isfinite(val_loss).any():
        best = x[int(np.nanargmin(val_loss))]
        loss_axes.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best})")
        f1_axes.axvline(best, color="grey", linestyle="--", linewidth=1)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("loss")
    loss_axes.legend(fontsize=8)
    for rank in ranks:
        series = _series(epochs, f"val_{rank}_f1")
        if series is not None:
            f1_axes.plot(x, series, marker="o", label=rank)
    f1_axes.set_ylim(0.0, 1.02)
    f1_axes.set_xlabel("epoch")
    f1_axes.set_ylabel("macro F1")
    f1_axes.set_title("validation macro F1 per rank")
    if f1_axes.get_legend_handles_labels()[0]:
        f1_axes.legend(fontsize=8)
    for axes in (loss_axes, f1_axes):
        axes.grid(alpha=0.3)
        axes.set_xlim(min(x) - 0.5, max(x) + 0.5)  # whole epochs only, also for a one-epoch run
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(Path(path), format="png")
    return True


def _series(history: Sequence[Mapping[str, object]], key: str) -> np.ndarray | None:
    if not any(key in h for h in history):
        return None
    return np.asarray([float(h[key]) if isinstance(h.get(key), (int, float)) else math.nan for h in history])


# ---------------------------------------------------------------------------------------------------------- text
def _number(value: float, digits: int = 3) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align_first_left: bool = False) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join((["---"] if align_first_left else []) +
                            ["---:"] * (len(header) - (1 if align_first_left else 0))) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _unseen_columns(taxonomy: Taxonomy) -> list[str]:
    leaf = taxonomy.ranks[-1]
    higher = list(reversed(taxonomy.ranks[:-1]))
    return ([f"unsure at {leaf}", f"{leaf} score below τ"] + [f"reported at {rank}" for rank in higher] +
            ["correct higher rank", "wrongly reliable", "unsure at every rank"])


def _unseen_values(result: UnseenClassResult, taxonomy: Taxonomy) -> list[float]:
    higher = list(reversed(taxonomy.ranks[:-1]))
    return ([result.unsure_at_leaf, result.flagged_at_leaf] + [result.lowest_reliable.get(r, 0.0) for r in higher] +
            [result.correct_higher, result.wrongly_reliable, result.unsure_everywhere])


def _unseen_markdown(unseen: UnseenReport, taxonomy: Taxonomy) -> list[str]:
    leaf = unseen.leaf_rank
    lines = [f"## Unseen {leaf} (`{unseen.dataset}`" + (f", split(s) {', '.join(unseen.splits)}" if unseen.splits
                                                        else "") + ")", "",
             f"Images of {leaf} classes the model never saw, under known higher taxa. The right answer is "
             f"\"unsure at {leaf}\" with the lowest reliable rank a correct higher rank; \"wrongly reliable\" counts "
             "answers reported at a rank whose class is wrong (a reported unseen leaf is always wrong).", ""]
    header = [leaf, "known lineage", "images", *_unseen_columns(taxonomy)]
    rows = [[c.name, " > ".join(x if x is not None else "?" for x in c.lineage) or MISSING, str(c.images),
             *(_percent(v) for v in _unseen_values(c, taxonomy))] for c in unseen.classes]
    overall = unseen.overall
    rows.append(["**all**", "", str(overall.images), *(_percent(v) for v in _unseen_values(overall, taxonomy))])
    lines += [_markdown_table(header, rows, align_first_left=True), ""]
    lines += [f"### Telling unseen from known at the {leaf} rank", "",
              f"Known: the {unseen.known_images} images of the evaluated split; unseen: the {overall.images} images "
              "above. AUROC 0.5 = chance, 1.0 = perfect; FPR@95%TPR = share of unseen images still accepted when "
              "95% of known images are.", ""]
    rows = [[_SCORE_LABELS.get(name, name), _number(values["auroc"]), _percent(values["fpr_at_95_tpr"])]
            for name, values in unseen.separation.items()]
    lines += [_markdown_table(["score", "AUROC", "FPR@95%TPR"], rows, align_first_left=True), ""]
    lines += [f"Known images not reported at {leaf}: {_percent(unseen.known_unsure_at_leaf)} "
              f"(score below τ: {_percent(unseen.known_flagged_at_leaf)}); unseen images not reported at {leaf}: "
              f"{_percent(overall.unsure_at_leaf)}.", ""]
    return lines


def _unseen_csv(unseen: UnseenReport, taxonomy: Taxonomy) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [c.replace(" ", "_").replace("τ", "threshold") for c in _unseen_columns(taxonomy)]
    writer.writerow([unseen.leaf_rank, *taxonomy.ranks[:-1], "images", *columns])
    for result in [*unseen.classes, unseen.overall]:
        lineage = list(result.lineage) + [None] * (taxonomy.depth - 1 - len(result.lineage))
        writer.writerow([result.name, *("" if x is None else x for x in lineage), result.images,
                         *(repr(float(v)) for v in _unseen_values(result, taxonomy))])
    return buffer.getvalue()


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

