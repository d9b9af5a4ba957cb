"""The report's figures of the model: reconstruction error against the threshold, and one anomaly's
per-feature contributions. Drawn with figures.py's Painter (matplotlib stays imported there only);
called by page.py like the other ``draw_*``.
"""
from __future__ import annotations

from app.services.ops.reports.facts import CONTRIBUTION_MEASURE, ModelAnomaly, ModelScores, fmt_time
from app.services.ops.reports.figures import Drawn, Painter, _short_list, _utc
from app.services.text import counted


def draw_reconstruction(p: Painter, model: ModelScores | None) -> Drawn | None:
    if model is None:
        return None
    scores, errors = model.scores, model.errors
    # evaluations' thresholds before the per-round errors began (a database older than migration 9)
    thresholds = [r for r in model.thresholds if not errors or r["at"] < errors[0]["at"]]
    fig, axes = p.figure(1, 1, height=4.2)
    ax = axes[0, 0]
    values: list[float] = []
    if errors:
        times = [_utc(r["at"]) for r in errors]
        ax.plot(times, [r["max_error"] for r in errors], color="tab:blue", linewidth=1.0,
                label="error per round (worst port)")
        ax.plot(times, [r["median_error"] for r in errors], color="tab:gray", alpha=0.8, linewidth=0.8,
                label="error per round (median port)")
        values += [r["max_error"] for r in errors] + [r["median_error"] for r in errors]
        values += _threshold_steps(ax, errors, model.end)
    if thresholds:
        # each threshold holds until the next evaluation; the last one until the end of the window
        until = errors[0]["at"] if errors else model.end
        steps = list(thresholds) + [{"at": until, "threshold": thresholds[-1]["threshold"]}]
        ax.plot([_utc(r["at"]) for r in steps], [r["threshold"] for r in steps], drawstyle="steps-post",
                color="black", linewidth=1.5, label="threshold (per evaluation)")
        values += [r["threshold"] for r in thresholds]
    if scores:
        ax.scatter([_utc(r["created_at"]) for r in scores], [r["score"] for r in scores], color="tab:red", s=24,
                   zorder=3, label="anomaly (score above threshold)")
        values += [r["score"] for r in scores]
        per_score_threshold = [r for r in scores if r["threshold"] is not None]
        if per_score_threshold and not thresholds and not errors:
            ax.scatter([_utc(r["created_at"]) for r in per_score_threshold],
                       [r["threshold"] for r in per_score_threshold], marker="_", s=200, color="black",
                       label="threshold at that anomaly")
            values += [r["threshold"] for r in per_score_threshold]
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_ylabel("reconstruction error (scaled units)")
    ax.set_title("Model: error of each judged round against the threshold of each model version")
    ax.legend(loc="upper left", fontsize="small")
    p.time_axis(ax)
    p.save(fig, "reconstruction_error.png")
    versions = len({r["model_version"] for r in errors})
    judged = (f"{counted(len(errors), 'judged round')} by {counted(versions, 'model version')}; "
              if errors else "")
    return Drawn("reconstruction_error.png", "model", "Reconstruction error against the threshold",
                 f"{judged}{counted(len(scores), 'model anomaly', 'model anomalies')}; the steps are the "
                 "threshold each model version judged with.")


def _threshold_steps(ax, errors: list, end: float | None) -> list[float]:
    """One step line per model version: its threshold from its first judged round until the next
    version's (the last until ``end``); an infinite threshold (stored NULL) leaves a gap."""
    runs: list[list] = []
    for r in errors:
        if not runs or runs[-1][0]["model_version"] != r["model_version"]:
            runs.append([])
        runs[-1].append(r)
    colors = ("black", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")
    labelled: set[int] = set()
    drawn: list[float] = []
    for k, run in enumerate(runs):
        until = runs[k + 1][0]["at"] if k + 1 < len(runs) else max(end or run[-1]["at"], run[-1]["at"])
        ys = [r["threshold"] if r["threshold"] is not None else float("nan") for r in run]
        version = run[0]["model_version"]
        label = None
        if version not in labelled and len(labelled) < len(colors):
            label = f"threshold, model v{version}"
            labelled.add(version)
        ax.plot([_utc(r["at"]) for r in run] + [_utc(until)], ys + ys[-1:], drawstyle="steps-post",
                color=colors[version % len(colors)], linewidth=1.6, label=label)
        drawn += [y for y in ys if y == y]
    return drawn


def draw_contributions(p: Painter, anomaly: ModelAnomaly, top: int = 12) -> Drawn | None:
    features = sorted(anomaly.features, key=lambda f: abs(f.contribution), reverse=True)[:top]
    if not features:
        return None
    features.reverse()   # largest at the top of a horizontal bar chart
    names = [f.name for f in features]
    with_values = [f for f in features if f.observed is not None and f.reconstructed is not None]
    cols = 2 if with_values else 1
    fig, axes = p.figure(1, cols, height=max(3.0, 0.38 * len(features) + 1.6), width=11.0)
    ax = axes[0, 0]
    ax.barh(range(len(features)), [f.contribution for f in features], color="tab:red", label="contribution")
    ax.set_yticks(range(len(features)), names)
    ax.set_xlabel(CONTRIBUTION_MEASURE)
    ax.set_title("Per-feature contribution")
    ax.grid(True, axis="x", alpha=0.3)
    if with_values:
        ax2 = axes[0, 1]
        pos = range(len(features))
        height = 0.4
        ax2.barh([i + height / 2 for i in pos], [f.observed if f.observed is not None else 0 for f in features],
                 height=height, color="tab:blue", label="observed")
        ax2.barh([i - height / 2 for i in pos],
                 [f.reconstructed if f.reconstructed is not None else 0 for f in features],
                 height=height, color="tab:gray", label="reconstructed")
        ax2.set_yticks(list(pos), [""] * len(features))
        magnitudes = [abs(v) for f in features for v in (f.observed, f.reconstructed) if v]
        if magnitudes and max(magnitudes) / min(magnitudes) > 100:   # packets next to bytes: keep both visible
            ax2.set_xscale("symlog", linthresh=max(min(magnitudes), 1e-3))
        ax2.set_xlabel("value in the feature's own units" + (" (symlog scale)" if ax2.get_xscale() == "symlog" else ""))
        ax2.set_title("Observed vs reconstructed")
        ax2.legend(loc="lower right", fontsize="small")
        ax2.grid(True, axis="x", alpha=0.3)
    port = anomaly.port
    score = "-" if anomaly.score is None else f"{anomaly.score:.4g}"
    threshold = "-" if anomaly.threshold is None else f"{anomaly.threshold:.4g}"
    sources = _short_list(anomaly.sources, 3)
    fig.suptitle(f"Anomaly #{anomaly.id} on {port} at {fmt_time(anomaly.created_at)}\n"
                 f"score {score} (threshold {threshold})" + (f"; sources: {sources}" if sources else ""),
                 fontsize="medium")
    name = f"contributions_{int(anomaly.id)}.png"
    p.save(fig, name)
    return Drawn(name, "contributions", f"Anomaly #{anomaly.id} on {port}",
                 f"The {len(features)} features that contributed most to anomaly #{anomaly.id}'s reconstruction error.")
