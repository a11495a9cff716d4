"""CLI of the predict stage (thin: parses arguments, calls library functions).

    codejepa predict train STORE.h5 --model mlp|transformer [--preset NAME] [--config FILE.toml]
        [--set key=value ...] --out RUN_DIR [--resume] [--device auto]
    codejepa predict cross STORE.h5 --out RUN_DIR [--set key=value ...] [--resume]

Under ``torchrun --nproc_per_node N $(which codejepa) predict train ...`` the same command
trains with DDP (``train.batch_size`` is the global batch).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from codejepa.predict.config import PRESETS  # stdlib only: keeps `--help` fast

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _callback() -> None:
    """predict stage: train predictors of a teacher's body states against a store."""


def _fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@app.command("train")
def train_cmd(
    store: Path = typer.Argument(..., help="The HDF5 store written by `codejepa embed run`."),
    model: Optional[str] = typer.Option(None, "--model", help="mlp | transformer (optional with --resume)."),
    out: Path = typer.Option(..., "--out", help="Run directory (config, stats, checkpoints, log, curves)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A TOML file of settings (tables model, loss, optim, train, ...), or a run's config.json."),
    preset: Optional[str] = typer.Option(None, "--preset", help=f"{' | '.join(PRESETS)} (default: seed-mlp or transformer)."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set optim.lr=3e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    splits: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--splits", help="A split file of `codejepa corpus folds` (one fold) instead of the store's own split."),
    probe: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--probe", help="The probe view (`codejepa embed probe`) that loss.probe_weight mixes into InfoNCE's "
                              "query (default: STORE.probe.h5; a resumed run: the view it started with)."),
) -> None:
    """Train a predictor; model selection on validation retrieval (MRR)."""
    from codejepa.core import CLI_ERRORS, error_line
    from codejepa.predict.config import ConfigError, parse_set, resolve_config

    try:
        overrides = parse_set(set_)
        if model is not None and model not in ("mlp", "transformer"):
            raise ConfigError(f"--model must be mlp or transformer, not {model!r}")
        has_run = (out / "config.json").exists()
        if resume and has_run and model is None and config is None and preset is None:
            # Continue with the run's own config; only settings that may change on resume are applied.
            from codejepa.predict.config import apply_overrides, read_run_config

            cfg = apply_overrides(read_run_config(out / "config.json"), overrides).validate()
        elif resume and not has_run and model is None:
            raise ConfigError(f"{out}: no run to resume here (no config.json); start one with --model")
        else:
            if config is not None and splits is None:
                _same_split(config)
            # without --model, the config file names the kind (a run's config.json does)
            cfg = resolve_config(model, preset=preset, file=config, overrides=overrides)
        _run(store, cfg, out, resume, device, splits, probe)
    except CLI_ERRORS as e:
        _fail(error_line(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; continue with: {_resume_command(store, out, splits)}", 130)


def _same_split(config: Path) -> None:
    """A run's config.json says nothing of the split file it was trained with; its run.json
    does. Trained again without it, the run would learn on another split and say nothing."""
    from codejepa.predict.config import ConfigError
    from codejepa.predict.train import run_record

    splits = run_record(config.parent).get("splits") if config.name == "config.json" else None
    file = splits.get("file") if isinstance(splits, dict) else None
    if file:
        raise ConfigError(f"{config} is the config of a run trained with --splits {file}: pass --splits again "
                          "(that file for the same run, another for another fold)")


def _split_line(e: dict[str, Any]) -> str:
    return (f"split from {e['file']}: {e['label']}"
            + (f" ({e['listed_records_not_in_store']} of its records are not in the store)"
               if e["listed_records_not_in_store"] else ""))


def _resume_command(store: Path, out: Path, splits: Path | None, command: str = "train") -> str:
    """The line that continues this training: under torchrun, with as many ranks."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    launcher = (f"torchrun --nproc-per-node {world} -m codejepa.cli" if world.isdigit() and int(world) > 1
                else "codejepa")
    with_splits = f" --splits {shlex.quote(str(splits))}" if splits is not None else ""
    return f"{launcher} predict {command} {shlex.quote(str(store))} --out {shlex.quote(str(out))}{with_splits} --resume"


@app.command("cross")
def cross_cmd(
    store: Path = typer.Argument(..., help="The HDF5 store written by `codejepa embed run`."),
    out: Path = typer.Option(..., "--out", help="Run directory (config, checkpoints, log)."),
    set_: list[str] = typer.Option([], "--set", help="A setting, e.g. --set epochs=3 (repeatable; keys: "
                                                     "`codejepa.predict.cross.CrossConfig`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus folder, when it moved since the store was built."),
    splits: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--splits", help="A split file of `codejepa corpus folds` (one fold) instead of the store's own split."),
) -> None:
    """Train a cross-scorer that re-ranks a first stage's top candidates (`evaluate retrieval --rerank`).

    Under torchrun, DDP over its ranks."""
    from codejepa.core import CLI_ERRORS, error_line
    from codejepa.predict.cross import train_cross

    progress, bar, say = _progress_ui(quiet=os.environ.get("RANK", "0").strip() not in ("0", ""))

    def on_event(e: dict[str, Any]) -> None:
        ev = e["event"]
        if ev == "hard_negatives":
            say(f"hard negatives from a cross-fitted ridge (λ {e['alpha']:g}): {e['queries']} train queries "
                f"({e['share']:.0%}) have their body in the top; val measure on {e['val_queries']} queries "
                f"(ridge's own MRR there {e['val_ridge_mrr']:.3f})")
        elif ev == "windows":
            bar("windows", "token windows", e["done"], e["total"])
        elif ev == "model":
            say(f"cross-scorer: {e['parameters']:,} parameters, {e['steps']} steps")
        elif ev == "step":
            bar("epoch", f"epoch {e['epoch']}/{e['epochs']}", e["step"], e["steps"], f"loss {e['loss']:.4f}")
        elif ev == "epoch":
            say(f"epoch {e['epoch']:>3}  train {e['train_loss']:.4f}  val MRR among the hard candidates "
                f"{e['val_mrr']:.3f} (ridge {e['val_ridge_mrr']:.3f}){'  best' if e['best'] else ''}")
        elif ev == "warning":
            say(f"warning: {e['message']}", style="yellow")
        elif ev == "splits":
            say(_split_line(e))
        elif ev == "done":
            say(f"best val MRR {e['best_val_mrr']:.3f} → {e['out']}/best.pt")

    try:
        with progress:
            train_cross(store, out, resume=resume, overrides=set_, device=device, corpus=corpus, on_event=on_event,
                        splits=splits)
    except CLI_ERRORS as e:
        _fail(error_line(e))
    except KeyboardInterrupt:
        again = _resume_command(store, out, splits, "cross")
        _fail(f"interrupted; continue with: {again}{f' --corpus {shlex.quote(str(corpus))}' if corpus else ''}", 130)


@app.command("config")
def config_cmd(
    model: str = typer.Option("mlp", "--model", help="mlp | transformer"),
    config: Optional[Path] = typer.Option(None, "--config", help="A TOML file of settings."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A preset name."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting (repeatable)."),
) -> None:
    """Print the resolved config (every key --set and TOML files accept), as JSON."""
    import json

    from codejepa.core import CLI_ERRORS, error_line
    from codejepa.predict.config import parse_set, resolve_config

    try:
        cfg = resolve_config(model, preset=preset, file=config, overrides=parse_set(set_))
    except CLI_ERRORS as e:
        _fail(error_line(e))
    typer.echo(json.dumps(cfg.to_dict(), indent=2))


def _progress_ui(quiet: bool = False) -> tuple[Any, Callable[..., None], Callable[..., None]]:
    """A training's progress bars on stderr: ``bar(key, description, done, total, info)`` keeps
    one bar per key, ``say(line, style)`` prints a line above them."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from codejepa.progress import Progress

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=quiet, transient=False)
    tasks: dict[str, Any] = {}

    def bar(key: str, desc: str, done: int, total: int, info: str = "") -> None:
        if key not in tasks:
            tasks[key] = progress.add_task(desc, total=total, info=info)
        progress.update(tasks[key], completed=done, total=total, info=info, description=desc)

    def say(line: str, style: str | None = None) -> None:
        # Never markup: messages hold paths, and a path with brackets would be read as a tag.
        progress.console.print(line, style=style, soft_wrap=True, markup=False, highlight=False)

    return progress, bar, say


def _run(store: Path, cfg: Any, out: Path, resume: bool, device: str, splits: Path | None = None,
         probe: Path | None = None) -> None:
    from codejepa.predict.train import train

    quiet = os.environ.get("RANK", "0").strip() not in ("0", "")  # a bad RANK is refused by train()
    progress, bar, say = _progress_ui(quiet)

    def on_event(e: dict[str, Any]) -> None:
        ev = e["event"]
        if ev == "stats":
            bar("stats", "train-split statistics", e["done"], e["total"])
        elif ev == "cache":
            bar("cache", "feature cache (train)", e["done"], e["total"])
        elif ev == "step":
            bar("epoch", f"epoch {e['epoch']}/{e['epochs']}", e["step"], e["steps"], f"loss {e['loss']:.4f}")
        elif ev == "epoch":
            say(
                f"epoch {e['epoch']:>3}  train {e['train_loss']:.4f}  val {e['val_loss']:.4f}  "
                f"MRR {e['val_mrr']:.3f} (chance {e['val_chance_mrr']:.3f})  rank@1 {e['val_rank1']:.3f}  "
                f"cos {e['val_cos']:.3f} raw {e['val_cos_raw']:.3f}  eff.rank {e['pred_eff_rank']:.1f}/"
                f"{e['target_eff_rank']:.1f}  best@{e['best_epoch']}"
            )
        elif ev == "warning":
            say(f"warning: {e['message']}", style="yellow")
        elif ev == "splits":
            say(_split_line(e))
        elif ev == "probe":
            say(f"InfoNCE and val retrieval rank each prediction mixed with its probe view at weight {e['weight']:g} "
                f"({e['file']}): evaluate this run with `evaluate retrieval --probe`")
        elif ev == "ridge_init":
            say(f"linear path initialised with train-split ridge on {e['views']}: "
                f"λ {e['alpha']:g} (val MRR {e['val_mrr']:.3f})")
        elif ev == "score_map":
            say(f"InfoNCE and val retrieval score in the canonical space, fitted on {e['views']} "
                f"({e['train_records']} train records; top canonical correlation "
                f"{e['canonical_correlations_top'][0]:.3f})")
            if e.get("warning"):
                say(f"warning: {e['warning']}", style="yellow")
        elif ev == "start_val":
            say(f"epoch   0 (the ridge start)  MRR {e['val_mrr']:.3f}  rank@1 {e['val_rank1']:.3f}: "
                "best.pt until an epoch beats it")
        elif ev == "done":
            which = "the ridge start (epoch 0): no trained epoch beat it on val" if e["best_epoch"] == 0 else \
                f"epoch {e['best_epoch']}"
            say(f"best: {which}, val MRR {e['best_val_mrr']:.3f} → {out}/best.pt")

    with progress:
        train(store, cfg, out, resume=resume, device=device, on_event=on_event, splits=splits, probe=probe)


if __name__ == "__main__":  # pragma: no cover
    app(sys.argv[1:])
