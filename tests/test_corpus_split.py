"""Split by repository and leak filtering."""

from __future__ import annotations

from collections import Counter

import pytest

from codejepa.core import CodejepaError
from codejepa.corpus.extract import hash_normalised, normalise_body
from codejepa.corpus.split import (
    DROP_SPLIT_DUPLICATE,
    DROP_TRAIN_DUPLICATE,
    DROP_TRIVIAL,
    RepoIndex,
    assign_split,
    compute_dropped,
    parse_ratios,
)

NAMES = [f"github.com/org{i % 7}/repo{i}" for i in range(2000)]


def test_same_seed_same_split_and_seed_matters() -> None:
    a = {n: assign_split(n, seed=3) for n in NAMES}
    assert a == {n: assign_split(n, seed=3) for n in NAMES}
    b = {n: assign_split(n, seed=4) for n in NAMES}
    assert sum(a[n] != b[n] for n in NAMES) > 100


def test_adding_repos_keeps_the_others() -> None:
    before = {n: assign_split(n, seed=0) for n in NAMES[:100]}
    after = {n: assign_split(n, seed=0) for n in NAMES}  # 1,900 repos added
    assert all(after[n] == s for n, s in before.items())


def test_each_repo_in_exactly_one_split_with_80_10_10_proportions() -> None:
    counts = Counter(assign_split(n) for n in NAMES)
    assert set(counts) == {"train", "val", "test"} and sum(counts.values()) == len(NAMES)
    assert abs(counts["train"] / len(NAMES) - 0.8) < 0.03
    assert abs(counts["val"] / len(NAMES) - 0.1) < 0.02
    assert abs(counts["test"] / len(NAMES) - 0.1) < 0.02


def test_ratios() -> None:
    assert parse_ratios("80/10/10") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_ratios("1,1,2") == pytest.approx((0.25, 0.25, 0.5))
    assert all(assign_split(n, ratios=(0.0, 0.0, 1.0)) == "test" for n in NAMES[:50])
    # all zero: one line, not a ZeroDivisionError; nan would send every repository to one split
    for bad in ("80/20", "a/b/c", "-1/1/1", "0/0/0", "nan/1/1", "inf/1/1", "1e400/1/1"):
        with pytest.raises(CodejepaError):
            parse_ratios(bad)


def h(body: str) -> str:
    return hash_normalised(normalise_body(body))


def index(name: str, split: str, rows: list[tuple[str, str]]) -> RepoIndex:
    return RepoIndex(name, split, lambda: iter(rows))


def test_leak_filter_drops_train_bodies_trivial_and_in_split_duplicates() -> None:
    repos = [
        index("b-train", "train", [("t1", h("return 1")), ("t2", h("return 1")), ("t3", h("pass"))]),
        index("a-train", "train", [("t0", h("return 0"))]),
        index("v", "val", [("v1", h("return 1")), ("v2", h("pass")), ("v3", h("return 9")), ("v4", h("return 9"))]),
        index("x", "test", [("x1", h("return 9")), ("x2", h("return 0")), ("x3", h("...")), ("x4", h("return 7"))]),
    ]
    res = compute_dropped(repos)
    assert res.dropped == {
        "t2": DROP_SPLIT_DUPLICATE,
        "v1": DROP_TRAIN_DUPLICATE,
        "v2": DROP_TRIVIAL,
        "v4": DROP_SPLIT_DUPLICATE,
        "x2": DROP_TRAIN_DUPLICATE,
        "x3": DROP_TRIVIAL,
    }
    # A body shared by val and test is not a train leak: both keep it.
    assert "x1" not in res.dropped
    assert res.kept == Counter(train=3, val=1, test=2)
    assert res.counts[DROP_TRIVIAL] == 2 and sum(res.counts.values()) == len(res.dropped)
    kept_trivial = compute_dropped(repos, keep_trivial=True).dropped
    assert "v2" not in kept_trivial and "x3" not in kept_trivial
    assert kept_trivial["v1"] == DROP_TRAIN_DUPLICATE


def test_which_duplicate_survives_does_not_depend_on_source_order() -> None:
    repos = [index("z", "train", [("z1", h("return 1"))]), index("a", "train", [("a1", h("return 1"))])]
    assert compute_dropped(repos).dropped == compute_dropped(list(reversed(repos))).dropped == {"z1": DROP_SPLIT_DUPLICATE}


def test_keep_trivial_keeps_every_trivial_copy_in_train_too() -> None:
    """With ``keep_trivial`` trivial bodies are exempt from the duplicate rules in every split,
    train included: a second ``pass`` in train is kept, not dropped as a train duplicate."""
    repos = [
        index("a", "train", [("t1", h("pass")), ("t2", h("pass")), ("t3", h("..."))]),
        index("v", "val", [("v1", h("pass")), ("v2", h("return 1"))]),
    ]
    res = compute_dropped(repos, keep_trivial=True)
    assert res.dropped == {}
    assert res.kept == Counter(train=3, val=2)


def test_totals_count_every_record_before_filtering() -> None:
    """``total`` (the manifest's functions_per_split) counts records before the leak filter,
    ``kept`` after it: the two differ by exactly the dropped records of each split."""
    repos = [
        index("a", "train", [("t1", h("return 1")), ("t2", h("return 1"))]),
        index("v", "val", [("v1", h("return 1")), ("v2", h("pass")), ("v3", h("return 2"))]),
        index("x", "test", [("x1", h("return 3"))]),
    ]
    res = compute_dropped(repos)
    assert res.total == Counter(train=2, val=3, test=1)
    assert res.kept == Counter(train=1, val=1, test=1)
