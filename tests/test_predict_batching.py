"""Batches grouped by source file or repository (train.batch_groups)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _predict_fixtures import file_of, make_store, train_killed_at, write_corpus  # noqa: E402

from codejepa.embed.store import open_store  # noqa: E402
from codejepa.predict import train as train_module  # noqa: E402
from codejepa.predict.batching import BatchingError, epoch_order, group_runs, record_files  # noqa: E402
from codejepa.predict.config import ConfigError, resolve_config  # noqa: E402
from codejepa.predict.train import train  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.h5")


def test_epoch_order_packs_runs_of_one_group_and_visits_every_record_once() -> None:
    keys = np.random.default_rng(1).choice(np.array(["a.py", "b.py", "c.py", "d.py"]), size=103,
                                           p=[0.55, 0.25, 0.15, 0.05])
    runs = group_runs(keys, 8, np.random.default_rng(7))
    assert all(1 <= len(r) <= 8 and len(set(keys[r])) == 1 for r in runs)
    for k in np.unique(keys):  # as few runs as the size allows, every record of the key in one
        mine = [r for r in runs if keys[r[0]] == k]
        assert len(mine) == -(-int((keys == k).sum()) // 8)
        assert sorted(np.concatenate(mine).tolist()) == np.flatnonzero(keys == k).tolist()
    order = epoch_order(len(keys), np.random.default_rng(7), keys, group_size=8)
    assert sorted(order.tolist()) == list(range(len(keys)))
    same_as_next = (keys[order][1:] == keys[order][:-1]).mean()
    assert same_as_next > 0.85  # a plain shuffle: about 0.39 with these shares
    assert np.array_equal(order, epoch_order(len(keys), np.random.default_rng(7), keys, group_size=8))
    assert not np.array_equal(order, epoch_order(len(keys), np.random.default_rng(8), keys, group_size=8))
    # without keys it is the plain shuffle, as before grouping existed
    assert np.array_equal(epoch_order(50, np.random.default_rng(3)), np.random.default_rng(3).permutation(50))
    with pytest.raises(ValueError, match="group keys"):
        epoch_order(10, np.random.default_rng(0), keys)


def test_runs_of_files_come_in_a_shuffled_order() -> None:
    """The runs are shuffled, not only the records within a file: in key order, every epoch
    would walk through the files alphabetically, each batch holding the same neighbouring files."""
    keys = np.repeat([f"f{i:02d}.py" for i in range(20)], 4)
    order = epoch_order(len(keys), np.random.default_rng(0), keys, group_size=4)
    files = [str(k) for k in keys[order][::4]]  # one run of 4 per file: each run's file
    assert sorted(files) == sorted(set(keys.tolist())) and files != sorted(files)


def test_file_batches_hold_siblings_and_train(store_path: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "corpus", store_path)
    with open_store(store_path) as st:
        files = record_files(st, corpus)
        assert files[0] == f"{st.repos[0]}/{file_of(int(st.ids[0].split('::f')[1]))}"
        repos, train_idx = st.repos, st.indices("train")
    seen: list[np.ndarray] = []
    real_loader = train_module.batch_loader

    def spy(table, batches, **kw):
        seen.extend(np.asarray(b) for b in batches)
        return real_loader(table, batches, **kw)

    monkeypatch.setattr(train_module, "batch_loader", spy)
    over = {"model.mlp_hidden": "32", "model.linear_skip": "ridge", "loss.infonce_weight": 1.0,
            "train.batch_size": 16, "train.epochs": 2, "train.plot_every_s": -1,
            "train.batch_groups": "file", "train.group_size": 4, "data.corpus": str(corpus)}
    res = train(store_path, resolve_config("mlp", overrides=over), tmp_path / "file", device="cpu")
    assert np.isfinite(res["best_val_mrr"])
    keys = files[train_idx]
    assert len(seen) == 2 * (len(train_idx) // 16)
    for b in seen:  # each batch: 4 files' runs of 4 (a run cut at a batch edge leaves a short one)
        n_files = len(np.unique(keys[b]))
        assert n_files <= 16 // 4 + 1, n_files
    # each epoch draws its own order (seeded by seed and epoch): the same batches every epoch
    # would show the loss the same negatives again and again
    half = len(seen) // 2
    assert not all(np.array_equal(a, b) for a, b in zip(seen[:half], seen[half:]))
    # the same config with a plain shuffle mixes files: almost every batch has many
    seen.clear()
    train(store_path, resolve_config("mlp", overrides={**over, "train.batch_groups": "none"}),
          tmp_path / "plain", device="cpu")
    assert np.mean([len(np.unique(keys[b])) for b in seen]) > 8
    seen.clear()
    train(store_path, resolve_config("mlp", overrides={**over, "train.batch_groups": "repo", "train.group_size": 16}),
          tmp_path / "repo", device="cpu")
    assert all(len(np.unique(repos[train_idx][b])) <= 2 for b in seen)


def test_file_batches_without_a_corpus_give_one_clear_error(store_path: Path, tmp_path: Path) -> None:
    over = {"model.mlp_hidden": "32", "train.batch_size": 16, "train.epochs": 1, "train.plot_every_s": -1,
            "train.batch_groups": "file"}
    with pytest.raises(BatchingError, match="does not name one"):  # synthetic stores record no corpus
        train(store_path, resolve_config("mlp", overrides=over), tmp_path / "a", device="cpu")
    with pytest.raises(BatchingError, match="cannot be read"):
        train(store_path, resolve_config("mlp", overrides={**over, "data.corpus": str(tmp_path / "nowhere")}),
              tmp_path / "b", device="cpu")
    other = make_store(tmp_path / "other.h5", seed=5, n_repos=4, per_repo=3)  # ids repo0..3::f0..2 only
    corpus = write_corpus(tmp_path / "small", other)
    with pytest.raises(BatchingError, match="not in the corpus"):
        train(store_path, resolve_config("mlp", overrides={**over, "data.corpus": str(corpus)}),
              tmp_path / "c", device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c" / "run.json").exists()
    # the store's own corpus, built again since (same record ids, other texts): refused by its fingerprint
    import dataclasses

    from codejepa.predict.batching import corpus_columns

    mine = write_corpus(tmp_path / "mine", store_path)
    with open_store(store_path) as st:
        assert len(corpus_columns(st, mine, why="x")["body"]) == len(st)  # a store that names no fingerprint
        st.meta = dataclasses.replace(st.meta, corpus_manifest_hash="0" * 64)
        with pytest.raises(BatchingError, match="is another one .*built again since"):
            corpus_columns(st, mine, why="train.batch_groups = 'file'")
    with pytest.raises(ConfigError, match="batch_groups"):
        resolve_config("mlp", overrides={"train.batch_groups": "folder"})


@pytest.mark.parametrize("lexical_weight", [0.0, 0.5])  # with the BM25 offset, which reads the corpus too
def test_file_batches_resume_after_a_kill_to_the_same_weights(store_path: Path, tmp_path: Path,
                                                              lexical_weight: float) -> None:
    corpus = write_corpus(tmp_path / "corpus", store_path)
    over = {"model.mlp_hidden": "32", "model.linear_skip": "ridge", "loss.infonce_weight": 1.0,
            "train.batch_size": 16, "train.epochs": 2, "train.checkpoint_every_steps": 5, "train.plot_every_s": -1,
            "train.batch_groups": "file", "train.group_size": 4, "data.corpus": str(corpus),
            "loss.lexical_weight": lexical_weight}
    cfg = resolve_config("mlp", overrides=over)
    train(store_path, cfg, tmp_path / "a", device="cpu")

    train_killed_at(store_path, cfg, tmp_path / "b", 28)  # mid-epoch 2, after the step-25 checkpoint
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["global_step"] == 25
    train(store_path, None, tmp_path / "b", resume=True, device="cpu")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("val_mrr_dense" in (tmp_path / "b" / "log.jsonl").read_text()) == (lexical_weight > 0)


def test_a_loader_worker_dies_with_its_training() -> None:
    """A training killed with -9 must not leave its store-reading workers behind: they hold the
    run folder's lock (inherited with the fork) and `--resume` would be refused until found."""
    import subprocess
    import sys
    import time

    script = (
        "import os, time\n"
        "from codejepa.predict.data import _die_with_parent\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    _die_with_parent(0)\n"
        "    os.close(1); os.close(2)\n"  # the pipes must not wait for it
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker = int(r.stdout.split()[0])

    def alive() -> bool:
        try:
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")  # a zombie waiting for init to reap it is dead

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()
