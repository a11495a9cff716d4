"""Fixtures for the embed stage's tests: tiny teachers built locally and small corpora.

The tiny causal teacher is a randomly initialised ``Qwen2ForCausalLM`` saved with a
byte-level BPE tokenizer trained here, so it goes through exactly the loading path a real
``Qwen/Qwen2.5-Coder-3B`` folder does.
"""

from __future__ import annotations

import json
from pathlib import Path

from codejepa.corpus.records import ContextPiece, FunctionRecord, Span, write_records

TRAIN_TEXT = [
    "import os\nimport sys\nfrom pathlib import Path\n",
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n",
    "class Parser:\n    def parse(self, text: str) -> list[str]:\n        return text.split()\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'even')\n",
    "with open(path, encoding='utf-8') as f:\n    data = json.load(f)\n",
    "héllo wörld — ünïcode ✓ 数据\n",
]


def make_tiny_qwen2(folder: Path, *, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised Qwen2 causal LM + a locally trained byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(TRAIN_TEXT * 5, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    # Random init gives a near-identity final norm; make it visibly non-trivial so that a
    # wrongly applied norm cannot go unnoticed.
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    model.save_pretrained(folder)
    return folder


def make_tiny_bert(folder: Path, *, layers: int = 3, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised BERT encoder with all-MiniLM-L6-v2's tokenizer: a bidirectional
    teacher that loads like the real one but runs in milliseconds."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    src = minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, folder / name)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=512, architectures=["BertModel"],
    )
    BertModel(cfg).save_pretrained(folder)
    return folder


def minilm_dir() -> Path:
    from codejepa.embed.teacher import resolve_teacher

    return resolve_teacher(None).path


def _span(a: int, b: int) -> Span:
    return Span(a, b, 1, 1)


def make_record(
    rid: str,
    *,
    repo: str = "r",
    split: str = "train",
    signature: str = "def f(x):",
    body: str = "    return x + 1\n",
    context: tuple[str, ...] = ("import os",),
) -> FunctionRecord:
    ctx = tuple(
        ContextPiece("import" if c.startswith(("import", "from")) else "sibling", c, _span(10 * i, 10 * i + len(c)))
        for i, c in enumerate(context)
    )
    sig_start = 1000
    return FunctionRecord(
        id=rid, repo=repo, url=f"https://example.invalid/{repo}", commit="0" * 40, path="m.py",
        qualname=rid, split=split, is_test=False, is_async=False, signature=signature, body=body,
        signature_span=_span(sig_start, sig_start + len(signature)),
        body_span=_span(sig_start + len(signature) + 1, sig_start + len(signature) + 1 + len(body)),
        context=ctx,
    )


def sample_records(n: int = 24, *, repos: int = 3) -> list[FunctionRecord]:
    """Varied records: lengths differ so that batching and bucketing do real work."""
    out = []
    splits = ["train", "val", "test"]
    for i in range(n):
        k = i % 7
        body = "".join(f"    y{j} = x * {j} + {i}\n" for j in range(1 + 3 * k)) + "    return y0\n"
        ctx = tuple(f"import mod{j}" for j in range(k % 4)) + ((f"def sibling_{i}(a, b):",) if i % 2 else ())
        out.append(make_record(
            f"rec{i:03d}", repo=f"repo{i % repos}", split=splits[(i % repos) % 3],
            signature=f"def func_{i}(x, n={i}):\n    \"\"\"Docstring {i}: ünïcode ✓.\"\"\"", body=body, context=ctx,
        ))
    return out


def write_corpus(folder: Path, records: list[FunctionRecord]) -> Path:
    """A minimal corpus directory: one records file per repo plus manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    repos: dict[str, list[FunctionRecord]] = {}
    for r in records:
        repos.setdefault(r.repo, []).append(r)
    entries = []
    for name, recs in repos.items():
        write_records(folder / "repos" / f"{name}.jsonl", recs)
        entries.append({"name": name, "split": recs[0].split, "status": "ok", "records_file": f"repos/{name}.jsonl"})
    (folder / "manifest.json").write_text(json.dumps(
        {"format": "codejepa-corpus", "format_version": 1, "repos": entries, "dropped": {}}, indent=1))
    return folder
