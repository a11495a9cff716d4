"""The recall@k plot draws what a reader can tell apart: each method alone and its best
corrected row, not every correction of every method."""

from __future__ import annotations

from types import SimpleNamespace

from codejepa.evaluate.plots import plotted_rows


def _row(method: str, mrr: float, space: str = "whitened") -> SimpleNamespace:
    metric = SimpleNamespace(value=mrr)
    return SimpleNamespace(method=method, space=space, metrics={"mrr": metric})


def test_a_panel_draws_each_method_and_its_best_corrected_row() -> None:
    panel = [_row("ridge", 0.40), _row("ridge+csls", 0.45), _row("ridge+csls+bm25", 0.55), _row("ridge+bm25+sib", 0.50),
             _row("ridge+last", 0.42), _row("tf+bm25", 0.6), _row("bm25", 0.3, "-"), _row("bm25+sib", 0.31, "-")]
    drawn = [r.method for r in plotted_rows(panel)]
    assert drawn == ["ridge", "ridge+csls+bm25", "ridge+last", "tf+bm25", "bm25", "bm25+sib"]


def test_a_long_title_is_wrapped_inside_a_one_panel_figure() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from codejepa.evaluate.plots import _fit

    fig = plt.figure(figsize=(6.4, 5.4))
    title = ("Where the true body ranks — 6055 test queries, each among 6055 distinct bodies (pool: the test split)\n"
             "each method alone and its best corrected row (every row: table.txt)")
    t = fig.suptitle(_fit(fig, title, 13), fontsize=13)
    fig.canvas.draw()
    box, page = t.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1, (box, page)
    plt.close(fig)


def test_the_rank_plot_says_in_words_what_each_query_was_ranked_among() -> None:
    from codejepa.evaluate.plots import _rank_title

    def title(label: str, size: float) -> str:
        return _rank_title({"pool": {"label": label, "n_queries": 6055, "mean_pool_size": size},
                            "settings": {"split": "test"}})

    assert title("split", 6055.0).endswith("6055 test queries, each among 6055 distinct bodies (pool: the test split)")
    assert title("all", 45218.0).endswith("each among 45218 distinct bodies (pool: the whole corpus)")
    assert title("repo", 756.9).endswith("each among on average 757 distinct bodies (pool: the query's repository)")
    assert title("random-1500", 1500.0).endswith("each among 1500 distinct bodies (pool: 1500 drawn at random)")


def test_the_recall_curve_at_k_counts_the_ranks_up_to_k(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The curve is recall@k, the share of queries ranked ≤ k (at k = 1 the table's rank@1), and the
    chance line k / pool size: an off-by-one would draw every curve one rank low."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from codejepa.evaluate.plots import plot_rank_distribution

    close = plt.close
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)  # keep the figure to read its lines
    ranks = np.array([1, 1, 2, 3, 5, 8, 13, 40])
    row = SimpleNamespace(method="ridge", space="raw", kind="baseline", ranks=ranks,
                          metrics={"mrr": SimpleNamespace(value=0.5), "rank@1": SimpleNamespace(value=0.25)})
    data = {"pool": {"mean_pool_size": 50.0, "label": "split", "n_queries": 8}, "settings": {"split": "test"}}
    path = plot_rank_distribution(data, [row], tmp_path)
    fig = plt.gcf()
    try:
        assert path.is_file()
        curve, chance = fig.axes[0].lines[:2]
        ks = curve.get_xdata()
        assert ks[0] == 1 and ks[-1] == 40 and curve.get_ydata()[-1] == 1.0  # the grid ends at the largest rank
        np.testing.assert_allclose(curve.get_ydata(), [(ranks <= k).mean() for k in ks])
        np.testing.assert_allclose(chance.get_ydata(), np.minimum(ks / 50.0, 1.0))
    finally:
        close(fig)


def test_every_drawn_line_differs_from_every_other_in_colour_or_style(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A method and its best derived row share a colour, so their styles must differ, also for
    space-independent methods (reverse, BM25) and for re-ranked and probe rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from codejepa.evaluate.plots import _base, plot_rank_distribution

    assert _base("ridge+last+probe+csls+bm25+sib+rerank") == "ridge+last"
    assert [_base(m) for m in ("bm25+sib+rerank", "bm25", "w96+csls", "reverse+csls+bm25+sib")] == \
        ["bm25", "bm25", "w96", "reverse"]
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    rng = np.random.default_rng(0)
    methods = [("ridge", "canonical", 0.3), ("ridge+csls+bm25+sib", "canonical", 0.4),
               ("ridge+csls+bm25+sib+rerank", "canonical", 0.45), ("w96", "canonical", 0.35),
               ("w96+probe+csls+bm25+sib+rerank", "canonical", 0.5), ("reverse", "-", 0.33),
               ("reverse+csls+bm25+sib", "-", 0.41), ("bm25", "-", 0.2), ("bm25+sib+rerank", "-", 0.3)]
    rows = [SimpleNamespace(method=m, space=sp, kind="baseline", ranks=rng.integers(1, 100, 50),
                            metrics={"mrr": SimpleNamespace(value=v), "rank@1": SimpleNamespace(value=v / 2)})
            for m, sp, v in methods]
    data = {"pool": {"mean_pool_size": 100.0, "label": "split", "n_queries": 50}, "settings": {"split": "test"}}
    plot_rank_distribution(data, rows, tmp_path)
    fig = plt.gcf()
    try:
        lines = fig.axes[0].lines
        drawn = {ln.get_label().split()[0] for ln in lines}
        assert drawn == {"ridge", "ridge+csls+bm25+sib+rerank", "w96", "w96+probe+csls+bm25+sib+rerank", "reverse",
                         "reverse+csls+bm25+sib", "bm25", "bm25+sib+rerank", "chance"}
        looks = [(tuple(np.round(matplotlib.colors.to_rgba(ln.get_color()), 3)), ln.get_linestyle()) for ln in lines]
        assert len(set(looks)) == len(looks), looks
    finally:
        close(fig)
