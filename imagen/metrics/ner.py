"""NER scores as the literature reports them: entity-level precision/recall/F1 (seqeval) and per-tag reports.

A report is `{row: {"precision", "recall", "f1", "support"}}` with one row per entity type (or tag) and the
rows `micro avg`, `macro avg`, `weighted avg`; the headline F1 is `report["micro avg"]["f1"]`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

AVERAGES = ("micro avg", "macro avg", "weighted avg")
SCORING_MODES = ("conlleval", "strict")


def entity_report(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], mode: str = "conlleval"
) -> dict:
    """Entity-level scores per type. `conlleval`: seqeval's default, which reads chunks like the CoNLL
    `conlleval` script (an `I-X` after `O` starts an entity); `strict`: IOB2 only (such an `I-X` is no entity)."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    if mode not in SCORING_MODES:
        raise ValueError(f"NER scoring mode {mode!r} is unknown; choose from {SCORING_MODES}")
    strict = {"mode": "strict", "scheme": IOB2} if mode == "strict" else {}
    raw = classification_report(
        [list(s) for s in gold], [list(s) for s in pred], output_dict=True, zero_division=0, **strict
    )
    report = {
        name: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for name, v in raw.items()
    }
    for name in AVERAGES:  # seqeval omits the averages when there is no entity at all
        report.setdefault(name, {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0})
    return report


def token_report(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], labels: Sequence[str] | None = None
) -> dict:
    """Per-tag scores over the flattened tags (B-LOC, I-LOC, ..., O), with micro/macro/weighted averages.

    Rows: `labels` (default: every tag in gold or pred, sorted) that occur in gold or pred.
    """
    gold_flat = [t for s in gold for t in s]
    pred_flat = [t for s in pred for t in s]
    if len(gold_flat) != len(pred_flat):
        raise ValueError(f"gold and pred hold {len(gold_flat)} and {len(pred_flat)} tags")
    support = Counter(gold_flat)
    predicted = Counter(pred_flat)
    correct = Counter(g for g, p in zip(gold_flat, pred_flat, strict=True) if g == p)
    present = set(support) | set(predicted)
    rows = [t for t in (labels or sorted(present)) if t in present]
    report = {tag: _scores(correct[tag], predicted[tag], support[tag]) for tag in rows}
    total = sum(support[t] for t in rows)
    report["micro avg"] = _scores(sum(correct[t] for t in rows), sum(predicted[t] for t in rows), total)
    per_tag = [report[t] for t in rows]
    n = max(len(per_tag), 1)
    report["macro avg"] = {k: sum(r[k] for r in per_tag) / n for k in ("precision", "recall", "f1")} | {
        "support": total
    }
    report["weighted avg"] = {
        k: sum(r[k] * r["support"] for r in per_tag) / max(total, 1) for k in ("precision", "recall", "f1")
    } | {"support": total}
    return report


def _scores(tp: int, predicted: int, support: int) -> dict:
    precision = tp / predicted if predicted else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def report_rows(report: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of a report, for tables: name, precision, recall, f1, support."""
    columns = ["name", "precision", "recall", "f1", "support"]
    return columns, [[name, *(values[c] for c in columns[1:])] for name, values in report.items()]


def report_table(report: dict, title: str):
    """A rich table of a report (scores with 4 decimals, the averages set apart)."""
    from rich.table import Table

    columns, rows = report_rows(report)
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "name" else "right")
    for averages in (False, True):
        if averages:
            table.add_section()
        for row in rows:
            if (row[0] in AVERAGES) == averages:
                table.add_row(row[0], *(f"{v:.4f}" for v in row[1:4]), str(row[4]))
    return table
