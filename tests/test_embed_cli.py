"""The `codejepa embed` commands end to end, with the real default teacher (all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _embed_fixtures import sample_records, write_corpus
from codejepa.cli import app
from codejepa.embed.store import open_store

runner = CliRunner()


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_run_info_shards_and_merge_with_the_default_teacher(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", sample_records(12))
    out = tmp_path / "store.h5"
    r = runner.invoke(app, ["embed", "run", str(corpus), "--out", str(out), "--device", "cpu", "--split", "train,test"])
    assert r.exit_code == 0, r.output
    with open_store(out) as s:
        assert s.meta.teacher == "sentence-transformers/all-MiniLM-L6-v2" and s.meta.layer == 3
        assert s.meta.teacher_kind == "bidirectional" and s.meta.hidden_size == 384
        assert set(s.splits) == {"train", "test"} and len(s) == 8
        x = s.inputs(0)
        assert x.special[0] and x.special[-1]  # [CLS] ... [SEP], stored and marked
        assert not s.body(0).special.any()
        pooled = s.pooled("body")
        assert pooled.shape == (8, 384) and np.isfinite(pooled).all()
    r = runner.invoke(app, ["embed", "info", str(out), "--json"])
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["records"] == 8 and info["meta"]["extra"]["complete"] is True and info["complete"] is True
    assert info["checksums"] is True
    r = runner.invoke(app, ["embed", "info", str(out)])
    assert r.exit_code == 0 and "complete" in r.stdout and "yes" in r.stdout and "Fletcher-32 per chunk" in r.stdout
    # rerun: nothing to do; then add the missing split to the same store
    r = runner.invoke(app, ["embed", "run", str(corpus), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with open_store(out) as s:
        assert len(s) == 12
    # two shards through the CLI, then merge
    for i in range(2):
        r = runner.invoke(app, ["embed", "run", str(corpus), "--out", str(tmp_path / "sh.h5"), "--device", "cpu",
                                "--shard", f"{i}/2"])
        assert r.exit_code == 0, r.output
    shards = sorted(tmp_path.glob("sh.shard-*-of-2.h5"))
    assert len(shards) == 2
    r = runner.invoke(app, ["embed", "merge", *map(str, shards), "--out", str(tmp_path / "merged.h5")])
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "merged.h5") as m, open_store(out) as s:
        assert sorted(m.ids) == sorted(s.ids)


def test_errors_are_one_line(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", sample_records(3))
    r = runner.invoke(app, ["embed", "run", str(corpus), "--out", str(tmp_path / "s.h5"), "--layer", "7"])
    assert r.exit_code == 1
    assert len(_lines(r.stderr)) == 1 and "-7..6" in r.stderr
    assert not (tmp_path / "s.h5").exists()
    (tmp_path / "bad.h5").write_bytes(b"\x00" * 100)
    for args in (["embed", "info", str(tmp_path / "bad.h5")],
                 ["embed", "run", str(corpus), "--out", str(tmp_path / "bad.h5")],
                 ["embed", "run", str(tmp_path), "--out", str(tmp_path / "x.h5")],
                 ["embed", "run", str(corpus), "--out", str(tmp_path / "x.h5"), "--shard", "3/2"],
                 ["embed", "run", str(corpus), "--out", str(tmp_path / "x.h5"), "--split", "dev"],
                 ["embed", "run", str(corpus), "--out", str(tmp_path / "x.h5"), "--split", ",,"],
                 ["embed", "run", str(corpus), "--out", str(tmp_path / "x.h5"), "--max-tokens", "3"],
                 ["embed", "run", str(corpus), "--out", str(tmp_path / "x.h5"), "--batch-tokens", "0"],
                 ["embed", "probe", str(tmp_path / "bad.h5"), "--seed", "-1"],
                 ["embed", "probe", str(tmp_path / "bad.h5"), "--batch-tokens", "-5"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert len(_lines(r.stderr)) == 1, r.stderr
        assert "Traceback" not in r.output
    assert not (tmp_path / "x.h5").exists()
    r = runner.invoke(app, ["embed", "run", str(corpus), "--out", str(tmp_path)])
    assert r.exit_code == 1 and "a folder, not a store file" in r.stderr
    # a path with brackets is text, not rich markup (it raised MarkupError, or lost "[red]")
    for odd in ("[/x]", "[red]"):
        r = runner.invoke(app, ["embed", "info", str(tmp_path / odd / "s.h5")])
        assert r.exit_code == 1 and len(_lines(r.stderr)) == 1 and odd in r.stderr, r.output


def test_ctrl_c_says_the_work_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import codejepa.embed.probe as probe_mod
    import codejepa.embed.run as run_mod

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "embed_corpus", interrupted)
    monkeypatch.setattr(probe_mod, "compute_probe_view", interrupted)
    for args in (["embed", "run", str(tmp_path), "--out", str(tmp_path / "s.h5")], ["embed", "probe", str(tmp_path / "s.h5")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 130 and "interrupted: every committed batch is kept" in r.stderr, r.output


def test_every_run_and_probe_flag_reaches_the_embedder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag `embed run` or `embed probe` parses but does not pass on would embed another store
    than asked (in-context targets for --targets body-only, float16 for --store-dtype float32,
    other probe bodies for --seed), silently."""
    import codejepa.embed.run as run_mod
    from codejepa.core import CodejepaError

    seen = {}

    def capture(corpus_dir, out, settings, progress=None):  # noqa: ANN001, ANN202
        seen.update(corpus=corpus_dir, out=out, settings=settings)
        raise CodejepaError("captured")

    monkeypatch.setattr(run_mod, "embed_corpus", capture)
    r = runner.invoke(app, ["embed", "run", str(tmp_path), "--out", str(tmp_path / "s.h5"), "--teacher", "some/model",
                            "--layer", "-2", "--device", "cpu", "--dtype", "float32", "--max-tokens", "64",
                            "--batch-tokens", "512", "--shard", "1/3", "--split", "val,test", "--targets", "body-only",
                            "--store-dtype", "float32"])
    assert r.exit_code == 1 and "captured" in r.stderr, r.output
    s = seen["settings"]
    assert (seen["corpus"], seen["out"]) == (tmp_path, tmp_path / "s.h5")
    assert (s.teacher, s.layer, s.device, s.dtype, s.max_tokens, s.batch_tokens, s.shard, s.splits, s.target_mode,
            s.store_dtype) == ("some/model", -2, "cpu", "float32", 64, 512, (1, 3), ("val", "test"), "body_only", "float32")
    import codejepa.embed.probe as probe_mod

    def capture_probe(store, out, settings, progress=None):  # noqa: ANN001, ANN202
        seen.update(store=store, out=out, settings=settings)
        raise CodejepaError("captured")

    monkeypatch.setattr(probe_mod, "compute_probe_view", capture_probe)
    r = runner.invoke(app, ["embed", "probe", str(tmp_path / "s.h5"), "--out", str(tmp_path / "p.h5"), "--probes", "3",
                            "--seed", "11", "--splits", str(tmp_path / "f.json"), "--teacher", "some/model",
                            "--device", "cpu", "--dtype", "float32", "--batch-tokens", "256", "--shard", "0/2"])
    assert r.exit_code == 1 and "captured" in r.stderr, r.output
    p = seen["settings"]
    assert (seen["store"], seen["out"]) == (tmp_path / "s.h5", tmp_path / "p.h5")
    assert (p.n_probes, p.seed, p.splits, p.teacher, p.device, p.dtype, p.batch_tokens, p.shard) == \
        (3, 11, str(tmp_path / "f.json"), "some/model", "cpu", "float32", 256, (0, 2))
