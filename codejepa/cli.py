"""The ``codejepa`` command: one sub-app per stage.

Each stage's ``cli.py`` only parses arguments and calls library functions; heavy imports
(torch, transformers) happen inside the commands so that ``codejepa --help`` stays fast.
"""

from __future__ import annotations

import typer

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


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
