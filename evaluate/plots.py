"""PNG plots of a retrieval result: where the true bodies rank, and whether predictions collapse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

RANK_PLOT = "rank_distribution.png"
PROJECTION_PLOT = "projection.png"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The suffixes of a derived row (evaluate's row names: NAME+probe+csls+bm25+sib+rerank).
_CORRECTIONS = ("csls", "bm25", "sib", "rerank", "probe")
# A method's own row and its best derived row share a colour and differ in line style; rows of
# space-independent methods (BM25, reverse) get the other pair of styles in every panel.
_STYLES = {(False, False): "-", (False, True): "--", (True, False): "-.", (True, True): ":"}


def _base(method: str) -> str:
    """The method a derived row comes from: ``tf+csls+bm25`` → ``tf``, ``ridge+last+probe+rerank`` →
    ``ridge+last``, ``bm25+sib`` → ``bm25``."""
    parts = method.split("+")
    while len(parts) > 1 and parts[-1] in _CORRECTIONS:
        parts.pop()
    return "+".join(parts)


def plotted_rows(panel: list[Any]) -> list[Any]:
    """The rows a panel draws: each method alone and its best derived row (by MRR), if any.

    With every correction of every method a panel held some forty curves that no reader could
    tell apart; the rest stay in the table and in retrieval.json.
    """
    keep: list[Any] = []
    for base in dict.fromkeys(_base(r.method) for r in panel):
        family = [r for r in panel if _base(r.method) == base]
        keep += [r for r in family if r.method == base]
        derived = [r for r in family if r.method != base]
        if derived:
            keep.append(max(derived, key=lambda r: r.metrics["mrr"].value))
    return keep


def _rank_title(data: dict[str, Any]) -> str:
    """What was ranked among what, in words: a pool label such as "split" alone reads as jargon."""
    pool, split = data["pool"], data["settings"]["split"]
    size = f"{pool['mean_pool_size']:.0f}"
    among = {"split": f"the {split} split", "all": "the whole corpus", "repo": "the query's repository"}.get(
        pool["label"], f"{size} drawn at random")
    mean = "on average " if pool["label"] == "repo" else ""  # only a repository pool's size varies by query
    return (f"Where the true body ranks — {pool['n_queries']} {split} queries, each among {mean}{size} distinct "
            f"bodies (pool: {among})")


def plot_rank_distribution(data: dict[str, Any], rows: list[Any], out_dir: Path) -> Path:
    """Recall@k curves (share of queries whose true body ranks ≤ k), one panel per space: each
    method alone and its best corrected row (:func:`plotted_rows`).

    Each method alone is drawn solid and its best derived row dashed; space-independent methods
    (random, BM25, reverse) appear dash-dotted (alone) and dotted (derived) in every panel. The
    chance line is the diagonal k / pool size, grey.
    """
    plt = _plt()
    spaces = [s for s in dict.fromkeys(r.space for r in rows) if s != "-"] or ["-"]
    shared = [r for r in rows if r.space == "-"]
    panels = {space: plotted_rows([r for r in rows if r.space == space] + (shared if space != "-" else []))
              for space in spaces}
    n_lines = max(len(p) for p in panels.values()) + 1
    # One legend entry per line, in one column: two columns of long run names overlap the next panel.
    fig, axes = plt.subplots(1, len(spaces), figsize=(6.4 * len(spaces), 5.2 + 0.2 * n_lines),
                             squeeze=False, sharey=True)
    max_rank = max(int(r.ranks.max()) for r in rows)
    # rounded, not truncated: logspace's last value can fall just short of max_rank (39.99… for 40), and a
    # truncated grid then ends one rank early, so the curve never reaches the queries ranked last
    ks = np.unique(np.rint(np.logspace(0, np.log10(max(max_rank, 2)), 200)).astype(int))
    # A method and its best derived row (NAME+csls, …+bm25+sib, …+rerank) share a colour and differ in
    # line style, so that twenty rows need ten colours, not twenty.
    bases = list(dict.fromkeys(_base(r.method) for r in rows))
    # tab20's ten dark hues first, then their light partners: the first ten methods never share a hue.
    palette = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    colour = {n: palette[i % len(palette)] for i, n in enumerate(bases)}
    pool_size = data["pool"]["mean_pool_size"]
    for ax, space in zip(axes[0], spaces):
        for r in sorted(panels[space], key=lambda r: -r.metrics["mrr"].value):  # legend best first
            curve = np.searchsorted(np.sort(r.ranks), ks, side="right") / len(r.ranks)
            label = f"{r.method}  (R@1 {r.metrics['rank@1'].value:.1%}, MRR {r.metrics['mrr'].value:.2f})"
            ax.plot(ks, curve, label=label, color=colour[_base(r.method)], lw=2.2 if r.kind == "run" else 1.5,
                    ls=_STYLES[(r.space == "-", r.method != _base(r.method))])
        ax.plot(ks, np.minimum(ks / pool_size, 1.0), color="grey", ls=(0, (1, 3)), lw=1.2, label="chance")
        ax.set_xscale("log")
        ax.set_xlim(1, max(max_rank, 2))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("rank k of the true body (log scale)", fontsize=11)
        ax.set_title(f"{space} space" if space != "-" else "space-independent", fontsize=12)
        ax.grid(True, which="both", alpha=0.3)
        # Below the panel: curves crowd the top-left corner, where a legend would hide them.
        ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    axes[0][0].set_ylabel("share of queries with rank ≤ k (recall@k)", fontsize=11)
    fig.suptitle(_fit(fig, _rank_title(data) + "\n"
                           "each method alone and its best corrected row (every row: table.txt)", 13), fontsize=13)
    fig.tight_layout()
    path = out_dir / RANK_PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_projection(projections: dict[str, dict[str, np.ndarray]], out_dir: Path, *, max_points: int = 600,
                    seed: int = 0) -> Path | None:
    """Predictions (colour) over targets (grey) on the targets' first two principal axes,
    one row per space, one column per method: a collapsed predictor is a tight blob."""
    spaces = [s for s, d in projections.items() if len(d) > 1]
    if not spaces:
        return None
    plt = _plt()
    methods = list(dict.fromkeys(m for s in spaces for m in projections[s] if m != "__targets__"))
    fig, axes = plt.subplots(len(spaces), len(methods), figsize=(3.6 * len(methods), 3.4 * len(spaces)),
                             squeeze=False)
    rng = np.random.default_rng(seed)
    for i, s in enumerate(spaces):
        t = projections[s]["__targets__"].astype(np.float64)
        sel = rng.choice(len(t), size=min(max_points, len(t)), replace=False)
        mu = t.mean(0)
        # Axes of the bulk: in a whitened space the top principal axes of all targets are the
        # directions of a handful of outlying bodies, which squeezes everything else into a dot.
        norm = np.linalg.norm(t - mu, axis=1)
        bulk = t[norm <= np.percentile(norm, 98)]
        mu = bulk.mean(0)
        _, _, vt = np.linalg.svd(bulk - mu, full_matrices=False)
        axes_2d = vt[:2].T
        tp = (t[sel] - mu) @ axes_2d
        lo, hi = np.percentile(tp, 1, axis=0), np.percentile(tp, 99, axis=0)
        pad = 0.15 * (hi - lo)
        lims = (lo - pad, hi + pad)
        for j, m in enumerate(methods):
            ax = axes[i][j]
            ax.scatter(tp[:, 0], tp[:, 1], s=5, c="0.7", label="targets", rasterized=True)
            if m in projections[s]:
                p = (projections[s][m][sel].astype(np.float64) - mu) @ axes_2d
                ax.scatter(p[:, 0], p[:, 1], s=5, c="tab:red", alpha=0.7, label="predictions", rasterized=True)
                spread = np.std(p, axis=0).sum() / max(np.std(tp, axis=0).sum(), 1e-12)
                ax.set_title(f"{m} — {s}\nspread / target spread = {spread:.2f}", fontsize=9)
            else:
                ax.set_title(f"{m} — {s} (not evaluated)", fontsize=9)
            ax.set_xlim(lims[0][0], lims[1][0])
            ax.set_ylim(lims[0][1], lims[1][1])
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle(_fit(fig, "Predictions vs targets on the top-2 principal axes of the targets' bulk (the 2% farthest "
                           "left out; collapse = a tight red blob; axes clipped to the targets' 1st–99th percentiles)",
                      11), fontsize=11)
    fig.tight_layout()
    path = out_dir / PROJECTION_PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fit(fig: Any, title: str, fontsize: float) -> str:
    """``title`` wrapped to the figure's width (a one-panel figure cut a long title at both edges)."""
    import textwrap

    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))
