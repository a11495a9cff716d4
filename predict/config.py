"""Typed training configuration: presets, TOML files and ``--set section.key=value`` overrides.

Resolution order (later wins): preset → TOML file → ``--set`` overrides. Every key is
checked against the dataclasses, so a misspelt key is one clear error instead of a
silently ignored setting. The resolved config is written to the run directory as JSON.
"""

from __future__ import annotations

import difflib
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from codejepa.core import CodejepaError, read_json_object

# Seeds feed torch.manual_seed (an unsigned 64-bit number) after arithmetic: kept well inside it.
SEED_LIMIT = 2**32
CROSS_KIND = "cross"  # a cross-scorer run's config.json names its kind so (codejepa.predict.cross)


class ConfigError(CodejepaError):
    """A config that cannot be resolved: unknown key, wrong type, bad value."""


INPUT_VIEWS = ("mean", "last", "first", "context")


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"  # "mlp" | "transformer"
    # mlp: pooled signature → hidden sizes → d, Linear → LayerNorm → activation between layers
    mlp_hidden: tuple[int, ...] = (1024, 512, 1024)
    activation: str = "gelu"  # "gelu" | "relu" | "silu"
    dropout: float = 0.0
    # A linear path beside the MLP: pooled = linear(x) + mlp(x). "ridge" initialises it with the
    # closed-form ridge regression input → pooled target fitted on the TRAIN split (λ chosen by
    # val MRR unless ridge_alpha > 0) and zeroes the MLP's last layer, so training starts exactly
    # at the ridge baseline and learns a residual; "zero" starts the linear path at zero.
    linear_skip: str = "none"  # "none" | "zero" | "ridge"
    ridge_alpha: float = 0.0  # λ relative to the mean eigenvalue of XᵀX (0: best val MRR of a grid)
    linear_trainable: bool = True  # False: the ridge path stays frozen, only the residual MLP trains
    # Which input views the ridge path reads: "select" fits ridge on every non-empty subset of
    # ``input_views`` and keeps the best val MRR (the other views' weights start at zero; the
    # residual still reads them), because a view that helps at one layer hurts at another;
    # "all" reads every view.
    ridge_views: str = "select"  # "select" | "all"
    input_dropout: float = 0.0  # dropout on the MLP branch's input (the linear path sees it whole)
    # What the MLP reads, concatenated, each per-dim standardised with train statistics: "mean"
    # (of the signature's tokens, the seed's input), "last" / "first" (the signature's last /
    # first kept token: in a bidirectional teacher the trailing newline's state summarises the
    # signature in context), "context" (mean of the context tokens). All from the inputs pass.
    input_views: tuple[str, ...] = ("mean",)
    # transformer (I-JEPA-style predictor)
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    body_slots: int = 8  # fixed number of mask tokens; body targets are pooled to this many
    max_input_tokens: int = 256  # context + signature tokens kept (far context dropped first)


@dataclass(frozen=True)
class MaskConfig:
    # "full": every body slot masked (the evaluation task). "multiblock": additionally, an
    # auxiliary pass reveals the body slots outside `num_blocks` random spans and regresses
    # the masked ones (I-JEPA multi-block masking). Evaluation always masks everything.
    strategy: str = "full"  # "full" | "multiblock"
    num_blocks: int = 2
    block_frac: float = 0.25  # share of the slots one masked span covers
    aux_weight: float = 0.5


@dataclass(frozen=True)
class NormConfig:
    input_token_ln: bool = False  # per-token layer norm of input states (I-JEPA style) instead of per-dim standardisation
    outlier_factor: float = 10.0  # a token whose norm exceeds factor × train median norm is an outlier (0: off)
    stats_sample_records: int = 2000  # train records used to estimate the median token norm
    eps: float = 1e-5
    # The space of pooled losses and of validation retrieval: per-dim standardised, or
    # ZCA-whitened with the train covariance of pooled bodies (shrunk towards isotropy).
    pooled_space: str = "standardized"  # "standardized" | "whitened" | "raw" (the seed: no normalisation)
    standardize_input: bool = True  # the MLP's pooled-signature input (False: raw, as the seed)
    whiten_shrink: float = 0.1


@dataclass(frozen=True)
class LossConfig:
    regression: str = "smoothl1"  # "smoothl1" | "mse" | "none" (on normalised states)
    regression_weight: float = 1.0
    # What the regression reads: "auto" the transformer's body slots (the per-token I-JEPA
    # target) or the MLP's pooled body; "pooled" the pooled body for both.
    regression_on: str = "auto"  # "auto" | "pooled"
    smoothl1_beta: float = 1.0
    cosine_weight: float = 0.0
    infonce_weight: float = 0.0
    temperature: float = 0.07
    symmetric: bool = False  # InfoNCE both ways: predictions → bodies and bodies → predictions
    variance_weight: float = 0.0  # VICReg-style hinge on the per-dimension std of predictions
    variance_gamma: float = 1.0
    # Where InfoNCE and the validation retrieval (model selection) score: "pooled" the pooled
    # space itself; "canonical" the evaluate stage's canonical space (the train CCA of the
    # [signature mean, last token] views and the pooled bodies, fitted at the start of the run,
    # codejepa.predict.canonical). On python-40 "canonical" lowers the hubness-corrected rows
    # by 1.5-3 points (bench/RESULTS.md, "Training in the canonical space"): hence not the default.
    space: str = "pooled"  # "pooled" | "canonical"
    # κ of the BM25 offset in InfoNCE's logits and in the validation retrieval, cos + κ·σ·z(BM25)
    # (codejepa.predict.lexical): trains the predictor for the BM25 hybrid evaluate scores it in.
    # 0: off. The evaluate stage's fusion weight w corresponds to κ = (1 − w)/w.
    lexical_weight: float = 0.0
    # w of the probe view (`codejepa embed probe`: the teacher's own reading of a body position
    # after the query's inputs) in InfoNCE's query and in the validation retrieval,
    # unit((1 − w)·unit(pred) + w·unit(view)), as evaluate's `+probe` rows mix it: the predictor
    # learns what the view lacks instead of repeating it. Its own predictions are then meant to
    # be evaluated with `evaluate retrieval --probe`. 0: off.
    probe_weight: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"  # "adam" (L2 weight decay, as the seed) | "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decay ends at lr × this
    grad_clip: float = 0.0  # 0: off


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global batch (split over DDP ranks)
    seed: int = 0
    checkpoint_every_steps: int = 100  # also mid-epoch (0: at epoch ends only); an epoch of a big store is 30+ min
    amp: bool = False  # bfloat16 autocast on CUDA
    threads: int = 0  # torch CPU threads (0: torch's default); 1 avoids oversubscription on a busy machine
    plot_every_s: float = 60.0  # curves.png is redrawn at most this often, and at the end (<0: never)
    # What a batch holds (see codejepa.predict.batching): "none" shuffles; "file" / "repo" pack
    # it from runs of up to group_size records of one source file / repository, so that the
    # in-batch negatives include the query's siblings.
    batch_groups: str = "none"  # "none" | "file" | "repo"
    group_size: int = 32


@dataclass(frozen=True)
class DataConfig:
    cache_gb: float = 8.0  # RAM cache of precomputed features when it fits; else stream from HDF5
    prefetch: int = 4  # batches prepared ahead (background thread, or worker processes)
    workers: int = 2  # when streaming: processes reading the store in parallel (0: one thread)
    corpus: str = ""  # the corpus the store was embedded from, for train.batch_groups = "file" ("": the store's record of it)


@dataclass(frozen=True)
class PredictConfig:
    """Every setting of a predictor and its training, in sections (model, mask, loss, norm,
    optim, train, data); ``name`` is the preset it started from. Built by :func:`resolve_config`
    (preset → TOML or config.json → ``--set``), checked by :meth:`validate`, saved as a run's
    config.json by :meth:`to_dict`."""

    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> PredictConfig:
        m, o, t, lo = self.model, self.optim, self.train, self.loss
        checks = [
            (m.kind in ("mlp", "transformer"), f"model.kind must be mlp or transformer, not {m.kind!r}"),
            (m.activation in ("gelu", "relu", "silu"), f"model.activation {m.activation!r} unknown"),
            (m.linear_skip in ("none", "zero", "ridge"), f"model.linear_skip {m.linear_skip!r} unknown"),
            (lo.regression_on in ("auto", "pooled"), f"loss.regression_on must be auto or pooled, not {lo.regression_on!r}"),
            (m.ridge_alpha >= 0, "model.ridge_alpha must be >= 0"),
            (m.ridge_views in ("select", "all"), f"model.ridge_views must be select or all, not {m.ridge_views!r}"),
            (len(m.input_views) >= 1 and all(v in INPUT_VIEWS for v in m.input_views)
             and len(set(m.input_views)) == len(m.input_views),
             f"model.input_views {m.input_views!r}: distinct names from {', '.join(INPUT_VIEWS)}"),
            (tuple(m.input_views) == ("mean",) or m.kind == "mlp" or m.linear_skip != "none",
             "model.input_views needs model.kind = mlp or a model.linear_skip (the transformer reads views only there)"),
            (0.0 <= m.dropout < 1.0 and 0.0 <= m.input_dropout < 1.0, "dropouts must be in [0, 1)"),
            (m.width % m.heads == 0, f"model.width ({m.width}) must be divisible by model.heads ({m.heads})"),
            (m.body_slots >= 1 and m.max_input_tokens >= 1 and m.depth >= 1 and all(h >= 1 for h in m.mlp_hidden),
             "model sizes (model.body_slots, model.max_input_tokens, model.depth, model.mlp_hidden) must be positive"),
            (self.mask.strategy in ("full", "multiblock"), f"mask.strategy {self.mask.strategy!r} unknown"),
            (self.norm.pooled_space in ("standardized", "whitened", "raw"), f"norm.pooled_space {self.norm.pooled_space!r} unknown"),
            (0.0 <= self.norm.whiten_shrink <= 1.0, "norm.whiten_shrink must be in [0, 1]"),
            (lo.regression in ("smoothl1", "mse", "none"), f"loss.regression {lo.regression!r} unknown"),
            (o.name in ("adam", "adamw"), f"optim.name {o.name!r} unknown"),
            (math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a positive number, not {o.lr}"),
            (len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas must be two numbers in [0, 1)"),
            (math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay must be ≥ 0"),
            (lo.smoothl1_beta > 0, "loss.smoothl1_beta must be positive"),
            (t.epochs >= 1, f"train.epochs must be ≥ 1, not {t.epochs}"),
            (t.batch_size >= 1, f"train.batch_size must be ≥ 1, not {t.batch_size}"),
            (0 <= t.seed < SEED_LIMIT, f"train.seed must be in [0, 2**32), not {t.seed}"),
            (math.isfinite(lo.temperature) and lo.temperature > 0, "loss.temperature must be positive"),
            (lo.space in ("pooled", "canonical"), f"loss.space must be pooled or canonical, not {lo.space!r}"),
            (lo.lexical_weight >= 0, "loss.lexical_weight must be ≥ 0"),
            (not lo.lexical_weight or lo.infonce_weight,
             "loss.lexical_weight offsets InfoNCE's logits: it needs loss.infonce_weight > 0"),
            (0.0 <= lo.probe_weight < 1.0, f"loss.probe_weight must be in [0, 1), not {lo.probe_weight}"),
            (not lo.probe_weight or lo.infonce_weight,
             "loss.probe_weight mixes the probe view into InfoNCE's query: it needs loss.infonce_weight > 0"),
            (t.batch_groups in ("none", "file", "repo"), f"train.batch_groups must be none, file or repo, not {t.batch_groups!r}"),
            (t.group_size >= 1, "train.group_size must be positive"),
            (t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be ≥ 0 (0: at epoch ends only)"),
            (self.data.workers >= 0 and self.data.prefetch >= 0 and self.data.cache_gb >= 0,
             "data.workers, data.prefetch and data.cache_gb must be ≥ 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if (lo.regression == "none" or lo.regression_weight == 0) and not (
            lo.cosine_weight or lo.infonce_weight
        ):
            raise ConfigError("the loss is empty: enable a regression, cosine or InfoNCE term")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    # The seed experiment's baseline, exactly: mean-pooled signature → 1024 → 512 → 1024 → d,
    # SmoothL1 on the raw (unnormalised) states, Adam (L2 weight decay 1e-4), lr 1e-3 with
    # cosine decay, batch 256, 100 epochs. Only model selection differs: val MRR, not loss.
    "seed-mlp": {"model.kind": "mlp", "norm.pooled_space": "raw", "norm.standardize_input": False},
    # The same network with the retrieval objective: in-batch InfoNCE beside the regression.
    "mlp-infonce": {"model.kind": "mlp", "loss.infonce_weight": 1.0, "loss.temperature": 0.05},
    # Starts AT the whitened-space ridge baseline (closed form on train, λ on val) and learns a
    # residual with in-batch InfoNCE beside the MSE, heavily regularised and early-stopped on val
    # MRR: on a few thousand functions an MLP from scratch stays below ridge (issue 7). It reads
    # the signature's mean AND its last token (the trailing newline, which sums up the signature
    # in context): +3 points rank@1 over the mean alone on real code.
    "ridge-residual": {
        "model.kind": "mlp", "model.mlp_hidden": (1024,), "model.linear_skip": "ridge", "model.input_views": ("mean", "last"),
        "model.dropout": 0.3, "model.input_dropout": 0.3,
        "norm.pooled_space": "whitened",
        "loss.regression": "mse", "loss.regression_weight": 1.0, "loss.infonce_weight": 1.0, "loss.temperature": 0.05,
        "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 1e-2,
        "train.epochs": 40, "train.batch_size": 256,
    },
    "transformer": {
        "model.kind": "transformer", "model.width": 256, "model.depth": 4, "model.heads": 4,
        "model.body_slots": 8, "model.max_input_tokens": 256,
        "loss.infonce_weight": 1.0, "loss.temperature": 0.05,
        "optim.name": "adamw", "optim.lr": 3e-4, "optim.weight_decay": 0.05,
        "optim.warmup_steps": 100, "optim.grad_clip": 1.0,
        "train.epochs": 30, "train.batch_size": 128,
    },
    # The transformer as a residual on the ridge path (issue 7): the pooled prediction is the
    # train-split ridge on the pooled views, plus a zero-started MLP on those views, plus a
    # zero-started head on the transformer's slot outputs, whose mask tokens attend over the
    # last context and signature tokens and are conditioned on the pooled views. Trained like
    # ridge-residual (MSE on the pooled body + InfoNCE, whitened), so it starts at ridge and
    # attention only has to add what the pooled views miss. Sized for a CPU.
    "transformer-residual": {
        "model.kind": "transformer", "model.width": 192, "model.depth": 2, "model.heads": 4,
        "model.body_slots": 4, "model.max_input_tokens": 96,
        "model.linear_skip": "ridge", "model.linear_trainable": False, "model.input_views": ("mean", "last", "first"),
        "model.mlp_hidden": (1024,), "model.dropout": 0.0, "model.input_dropout": 0.3,
        "norm.pooled_space": "whitened",
        "loss.regression": "mse", "loss.regression_on": "pooled", "loss.infonce_weight": 1.0, "loss.temperature": 0.05,
        "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 1e-2,
        "train.epochs": 6, "train.batch_size": 256,
    },
    # The same predictor sized for a CPU (the demo): ~16x fewer FLOPs per sample.
    "transformer-small": {
        "model.kind": "transformer", "model.width": 128, "model.depth": 2, "model.heads": 4,
        "model.body_slots": 8, "model.max_input_tokens": 128,
        "loss.infonce_weight": 1.0, "loss.temperature": 0.05,
        "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05,
        "optim.warmup_steps": 50, "optim.grad_clip": 1.0,
        "train.epochs": 20, "train.batch_size": 64,
    },
}
# ridge-residual with hard negatives: each batch is packed from whole source files (runs of up
# to 256 records of one file), so InfoNCE has to tell a body from its siblings, the confusion
# behind most of ridge's wrong first answers (codejepa.predict.batching). Needs the corpus the
# store was embedded from.
PRESETS["ridge-residual-files"] = {**PRESETS["ridge-residual"], "train.batch_groups": "file", "train.group_size": 256}
PRESETS["transformer-residual-files"] = {**PRESETS["transformer-residual"], "train.batch_groups": "file",
                                         "train.group_size": 256}
DEFAULT_PRESET = {"mlp": "seed-mlp", "transformer": "transformer"}


def _all_keys(cls: type = PredictConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted key → field type, for every leaf field."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            out.update(_all_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Coerce a TOML value or a command-line string to a field's type, or raise ConfigError."""
    def bad(why: str = "") -> ConfigError:
        return ConfigError(f"{key}: cannot use {value!r} as {getattr(tp, '__name__', tp)}{why}")

    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            parts = [p for p in value.strip().strip("()[]").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], p) for p in parts)
        if len(parts) != len(args):
            raise bad(f" (expected {len(args)} values)")
        return tuple(_coerce(key, a, p) for a, p in zip(args, parts))
    if origin in (typing.Union, types.UnionType):
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def _unknown(key: str, keys: dict[str, Any]) -> ConfigError:
    near = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known keys: {', '.join(sorted(keys))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def apply_overrides(cfg: PredictConfig, overrides: dict[str, Any]) -> PredictConfig:
    """Return ``cfg`` with dotted-key overrides applied (values coerced to the field types)."""
    keys = _all_keys()
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in keys:
            raise _unknown(key, keys)
        v = _coerce(key, keys[key], value)
        if "." in key:
            sec, name = key.split(".", 1)
            sections.setdefault(sec, {})[name] = v
        else:
            top[key] = v
    new = {sec: replace(getattr(cfg, sec), **kv) for sec, kv in sections.items()}
    return replace(cfg, **top, **new)


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["a.b=1", ...]`` → ``{"a.b": "1"}``; a missing ``=`` is a ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. optim.lr=3e-4)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as flat dotted keys (``[optim]\\nlr = 3e-4`` → ``optim.lr``); a ``.json``
    file (a run's ``config.json``) is read the same way, so that a run can be trained again
    from what it recorded."""
    p = Path(path)
    if p.suffix == ".json" and p.exists():
        return _flatten(_not_a_cross_run(read_json_object(p, "config file", ConfigError,
                                                          "give a TOML file or a run's config.json"), p))
    try:
        with open(p, "rb") as f:
            return _flatten(tomllib.load(f))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None


def from_dict(d: dict[str, Any]) -> PredictConfig:
    """Rebuild a config from :meth:`PredictConfig.to_dict` output (e.g. a run's config.json)."""
    return apply_overrides(PredictConfig(), _flatten(d)).validate()


RESUME_REFUSED = "the run cannot be resumed, start a new --out"


def _not_a_cross_run(d: dict[str, Any], path: Path) -> dict[str, Any]:
    if d.get("kind") == CROSS_KIND:  # else "unknown config key 'kind'", which names no way out
        raise ConfigError(f"{path}: a cross-scorer run's config; `codejepa predict cross` trains and resumes those")
    return d


def read_run_config(path: str | Path) -> PredictConfig:
    """A run's ``config.json``; a damaged or foreign one is refused in one line."""
    d = read_json_object(Path(path), "run config", ConfigError, RESUME_REFUSED)
    return from_dict(_not_a_cross_run(d, Path(path)))


def resolve_config(
    model: str | None = None,
    *,
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> PredictConfig:
    """Preset (default: the model's) → TOML file → overrides → ``model.kind = model``.

    Without ``model`` the file must name the kind (a run's ``config.json`` does), so that a run
    can be trained again from what it recorded; no kind at all is refused rather than guessed."""
    file_keys = load_toml(file) if file is not None else {}
    source = "--model"
    if model is None:
        model, source = file_keys.get("model.kind"), "the config file's model.kind"
        if model is None:
            raise ConfigError("--model is required (mlp or transformer)")
    if preset is None:
        preset = DEFAULT_PRESET.get(model)
        if preset is None:
            raise ConfigError(f"{source} must be mlp or transformer, not {model!r}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    kind = PRESETS[preset].get("model.kind")
    if kind not in (None, model):
        # Name the remedy for where the kind came from: changing the file's kind is the user's call.
        fix = f"use --model {kind}" if source == "--model" else f"set model.kind = {kind!r} in the config file"
        raise ConfigError(f"preset {preset!r} is a {kind} preset, but {source} is {model}: {fix}, or a preset of the {model}")
    for where, keys in (("the config file", file_keys), ("--set", overrides or {})):
        # --model decides the kind; a second, silently overruled answer would mislead.
        if keys.get("model.kind", model) != model:
            raise ConfigError(f"model.kind = {keys['model.kind']!r} in {where} contradicts {source} {model}")
    cfg = apply_overrides(PredictConfig(name=preset), PRESETS[preset])
    if file_keys:
        cfg = apply_overrides(cfg, file_keys)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg = apply_overrides(cfg, {"model.kind": model})
    return cfg.validate()
