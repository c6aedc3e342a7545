"""Scores of exposure classifiers against truth, side by side.

Pure functions: arrays in, :class:`ClassifierScores` out; the rule classifier's and a
feature-only gradient-boosting baseline's predictions; one figure (confusion matrices and
the ROC of "usable" = good vs not). The evaluation flow
(``flows.train_classifier.evaluate``) reads the data and calls these.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from survey_qa.atomic import atomic_target
from survey_qa.config import ClassifyConfig
from survey_qa.pipeline.classify import classify_rules
from survey_qa.pipeline.schema import CLASSES


@dataclass
class ClassifierScores:
    """How one classifier did on a set of labelled detectors.

    Attributes
    ----------
    name
        The classifier (``cnn``, ``rules``, ``gboost``).
    n
        Detectors scored.
    accuracy, macro_f1
        Over the five classes.
    precision, recall, f1
        Per class (NaN where a class is neither true nor predicted).
    confusion
        ``confusion[i][j]``: detectors of true class ``CLASSES[i]`` predicted ``CLASSES[j]``.
    roc_auc_usable
        Area under the ROC of ``p_good`` for "good" against every defect class.
    accuracy_any_confounder, n_any_confounder
        Accuracy on detectors carrying at least one confounder, and their number.
    accuracy_by_confounder
        ``name -> (accuracy, n)`` for each confounder present.
    """

    name: str
    n: int
    accuracy: float
    macro_f1: float
    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    confusion: list[list[int]]
    roc_auc_usable: float
    accuracy_any_confounder: float
    n_any_confounder: int
    accuracy_by_confounder: dict[str, tuple[float, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def score_predictions(name: str, y_true: np.ndarray, proba: np.ndarray,
                      confounders: list[str] | None = None,
                      y_pred: np.ndarray | None = None) -> ClassifierScores:
    """Score class probabilities against true labels.

    Parameters
    ----------
    name
        Classifier name for the report.
    y_true
        ``(n,)`` true class indices into ``CLASSES``.
    proba
        ``(n, 5)`` class probabilities (``CLASSES`` order).
    confounders
        ``(n,)`` comma-separated confounder names per detector ("" for none).
    y_pred
        Predicted indices; default: the argmax of ``proba``.
    """
    from sklearn.metrics import (accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support, roc_auc_score)

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    y_pred = proba.argmax(axis=1) if y_pred is None else np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(CLASSES)))
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                 zero_division=np.nan)
    per = {c: (p[i], r[i], f[i]) if i in present else (math.nan,) * 3
           for i, c in enumerate(CLASSES)}
    f_present = [per[CLASSES[i]][2] for i in present]
    macro_f1 = float(np.nanmean(np.nan_to_num(f_present, nan=0.0))) if present else math.nan
    usable = y_true == CLASSES.index("good")
    auc = (float(roc_auc_score(usable, proba[:, CLASSES.index("good")]))
           if 0 < usable.sum() < len(usable) else math.nan)
    conf = np.array([c or "" for c in (confounders if confounders is not None
                                       else [""] * len(y_true))], dtype=object)
    correct = y_pred == y_true
    has = conf != ""
    by_name = {}
    for cname in sorted({n for c in conf for n in c.split(",") if n}):
        sel = np.array([cname in c.split(",") for c in conf])
        by_name[cname] = (float(correct[sel].mean()), int(sel.sum()))
    return ClassifierScores(
        name=name, n=int(len(y_true)),
        accuracy=float(accuracy_score(y_true, y_pred)) if len(y_true) else math.nan,
        macro_f1=macro_f1,
        precision={c: float(v[0]) for c, v in per.items()},
        recall={c: float(v[1]) for c, v in per.items()},
        f1={c: float(v[2]) for c, v in per.items()},
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        roc_auc_usable=auc,
        accuracy_any_confounder=float(correct[has].mean()) if has.any() else math.nan,
        n_any_confounder=int(has.sum()), accuracy_by_confounder=by_name)


@dataclass
class GradientBoostingBaseline:
    """A feature-only baseline: sklearn ``HistGradientBoostingClassifier`` (NaN-aware).

    Features never measured in training are left out (sklearn cannot bin an all-NaN
    column).
    """

    model: object
    columns: np.ndarray

    def proba(self, features: np.ndarray) -> np.ndarray:
        """``(n, 5)`` probabilities in ``CLASSES`` order (0 for classes unseen in training)."""
        x = np.asarray(features, dtype=np.float64)[:, self.columns]
        p = self.model.predict_proba(x)
        out = np.zeros((len(p), len(CLASSES)))
        out[:, self.model.classes_.astype(int)] = p
        return out


def train_gradient_boosting(features: np.ndarray, labels: np.ndarray,
                            seed: int = 0) -> GradientBoostingBaseline:
    """Fit the gradient-boosting baseline on raw features (NaN where not measured)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.asarray(features, dtype=np.float64)
    columns = np.flatnonzero(np.isfinite(x).any(axis=0))
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1,
                                           class_weight="balanced", random_state=seed)
    model.fit(x[:, columns], np.asarray(labels, dtype=np.int64))
    return GradientBoostingBaseline(model=model, columns=columns)


def rule_predictions(rows: list[dict], cfg: ClassifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """The rule classifier on exposure rows: ``(n, 5)`` probabilities in ``CLASSES`` order
    and the ``(n,)`` class indices it decides
    (:func:`survey_qa.pipeline.classify.classify_rules`)."""
    rules = [classify_rules(r, cfg) for r in rows]
    probas = np.array([[r.probabilities[c] for c in CLASSES] for r in rules])
    return probas, np.array([CLASSES.index(r.quality_class) for r in rules])


def score_classifiers(table: pd.DataFrame, predictions: dict[str, tuple[np.ndarray, np.ndarray]]
                      ) -> tuple[list[ClassifierScores], list[ClassifierScores]]:
    """Score several classifiers on the same labelled detectors.

    Parameters
    ----------
    table
        One row per detector with ``label`` (index into ``CLASSES``), ``confounders``
        (comma-separated names) and ``fwhm_px``.
    predictions
        Classifier name -> ``(probabilities (n, 5), predicted class indices (n,))``.

    Returns
    -------
    tuple of lists
        The scores on every detector, and on the detectors with a PSF measurement
        (``fwhm_px`` finite) only.
    """
    y = table["label"].to_numpy()
    conf = table["confounders"].tolist()
    ok = np.isfinite(table["fwhm_px"].to_numpy(dtype=np.float64))
    every = [score_predictions(n, y, p, conf, y_pred=yp) for n, (p, yp) in predictions.items()]
    measured = [score_predictions(n, y[ok], p[ok], list(np.array(conf)[ok]), y_pred=yp[ok])
                for n, (p, yp) in predictions.items()]
    return every, measured


def format_scores(scores: list[ClassifierScores]) -> str:
    """A plain-text table: accuracy, macro-F1, AUC, confounder accuracy, per-class F1."""
    names = [s.name for s in scores]
    w = max(12, *(len(n) for n in names))
    lines = [f"{'':<26}" + "".join(f"{n:>{w}}" for n in names)]

    def line(label, values, fmt="{:.3f}"):
        lines.append(f"{label:<26}" + "".join(
            f"{(fmt.format(v) if v == v else 'n/a'):>{w}}" for v in values))

    line("detectors", [s.n for s in scores], "{:d}")
    line("accuracy", [s.accuracy for s in scores])
    line("macro F1", [s.macro_f1 for s in scores])
    line("ROC AUC usable (good)", [s.roc_auc_usable for s in scores])
    line("accuracy, any confounder", [s.accuracy_any_confounder for s in scores])
    for c in CLASSES:
        line(f"  F1 {c}", [s.f1[c] for s in scores])
    names_conf = sorted({k for s in scores for k in s.accuracy_by_confounder})
    for k in names_conf:
        n = scores[0].accuracy_by_confounder.get(k, (math.nan, 0))[1]
        line(f"  acc. {k} (n={n})"[:26], [s.accuracy_by_confounder.get(k, (math.nan, 0))[0]
                                          for s in scores])
    return "\n".join(lines)


def plot_evaluation(scores: list[ClassifierScores], y_true: np.ndarray,
                    probas: list[np.ndarray], path: str | Path) -> Path:
    """Confusion matrices of every classifier and their ROC curves (good vs not), as PNG.

    Uses matplotlib's Agg canvas directly (no GUI backend, no global pyplot state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    path = Path(path)
    n = len(scores)
    fig = Figure(figsize=(4.2 * (n + 1), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n + 1)
    short = ["good", "bad trk", "v.bad trk", "seeing", "backgr."]
    for ax, s in zip(axes[:n], scores):
        cm = np.asarray(s.confusion, dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(CLASSES)):
            for j in range(len(CLASSES)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(CLASSES)), short, rotation=45, fontsize=8)
        ax.set_yticks(range(len(CLASSES)), short, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{s.name}: acc {s.accuracy:.3f}, macro-F1 {s.macro_f1:.3f}", fontsize=9)
    roc = axes[n]
    usable = np.asarray(y_true) == CLASSES.index("good")
    for s, p in zip(scores, probas):
        if 0 < usable.sum() < len(usable):
            fpr, tpr, _ = roc_curve(usable, np.asarray(p)[:, CLASSES.index("good")])
            roc.plot(fpr, tpr, label=f"{s.name} (AUC {s.roc_auc_usable:.3f})")
    roc.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    roc.set_xlabel("false positive rate (defect called good)")
    roc.set_ylabel("true positive rate (good called good)")
    roc.set_title("usable (good) vs not", fontsize=9)
    roc.legend(fontsize=8, loc="lower right")
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, dpi=110, format=path.suffix.lstrip(".") or "png")
    return path
