"""The ``codejepa`` command: one sub-app per stage.

Each stage's ``cli.py`` only parses arguments and calls library functions; heavy imports
(torch, transformers) happen inside the commands so that ``codejepa --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import typer

from codejepa.core import torchrun_ranks
from codejepa.corpus.cli import app as corpus_app
from codejepa.embed.cli import app as embed_app
from codejepa.evaluate.cli import app as evaluate_app
from codejepa.predict.cli import app as predict_app

app = typer.Typer(
    name="codejepa",
    help="Latent code prediction: corpus → embed → predict → evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(corpus_app, name="corpus", help="Build function records from real repositories.")
app.add_typer(embed_app, name="embed", help="Per-token teacher states in an HDF5 store.")
app.add_typer(predict_app, name="predict", help="Train predictors against a store.")
app.add_typer(evaluate_app, name="evaluate", help="Instance-level retrieval against honest baselines.")


def stop_on_term() -> None:
    """Treat SIGTERM (how schedulers and ``torchrun`` stop a job) as Ctrl-C: every command then
    keeps what it finished and says how to continue, instead of dying without a word."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# The commands that share one job between torchrun's ranks; any other would run once per rank
# over the same files (two evaluations writing one --out, two merges racing for one lock).
DISTRIBUTED = {("embed", "run"), ("embed", "probe"), ("predict", "train"), ("predict", "cross")}


def one_process_only(argv: list[str], env: dict[str, str]) -> str | None:
    """Why a command line cannot run under torchrun's several ranks, or None."""
    world = torchrun_ranks(env)
    words = [a for a in argv if not a.startswith("-")][:2]
    if world == 1 or len(words) < 2 or tuple(words) in DISTRIBUTED:
        return None
    return (f"`codejepa {' '.join(words)}` runs in one process, not once per torchrun rank (WORLD_SIZE={world}); "
            "start it without torchrun")


def main() -> None:
    stop_on_term()
    why = one_process_only(sys.argv[1:], dict(os.environ))
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(1)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
