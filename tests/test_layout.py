"""The project's shape: stages install under codejepa.*, and data flows one way."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["corpus", "embed", "predict", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_installs_under_codejepa(stage: str) -> None:
    mod = importlib.import_module(f"codejepa.{stage}")
    assert Path(mod.__file__).resolve().parent == ROOT / stage


def test_no_top_level_stage_modules_shadow_other_packages() -> None:
    # `import evaluate` (or corpus, embed, predict) from anywhere must not find our stage
    # folders: they would shadow other distributions such as Hugging Face's `evaluate`.
    code = (
        "import importlib.util, sys\n"
        f"for name in {STAGES!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        f"    if spec is not None and (spec.origin or '').startswith({str(ROOT)!r}):\n"
        "        sys.exit(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _imported_stages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            parts = n.split(".")
            if parts[0] == "codejepa" and len(parts) > 1 and parts[1] in STAGES:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_only_earlier_stages(stage: str) -> None:
    allowed = set(STAGES[: STAGES.index(stage) + 1])
    for path in sorted((ROOT / stage).rglob("*.py")):
        bad = _imported_stages(path) - allowed
        assert not bad, f"{path.relative_to(ROOT)} imports later stage(s) {sorted(bad)}"


def test_core_imports_no_stage() -> None:
    for path in (ROOT / "codejepa").glob("*.py"):
        if path.name == "cli.py":  # the CLI assembles the stages' sub-apps
            continue
        assert not _imported_stages(path), path


def test_cli_lists_every_stage() -> None:
    from typer.testing import CliRunner

    from codejepa.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output


def test_every_command_lists_a_one_line_summary() -> None:
    """A group's command list shows each docstring's first paragraph with its line breaks: a
    summary wrapped in the source reads as ragged lines there."""
    import typer.main

    from codejepa.cli import app

    root = typer.main.get_command(app)
    groups = root.commands  # type: ignore[attr-defined]
    assert set(groups) == set(STAGES)
    for group in groups.values():
        assert group.commands
        for name, cmd in group.commands.items():
            summary = (cmd.help or "").strip().split("\n\n")[0]
            assert summary and "\n" not in summary, f"{group.name} {name}: {summary!r}"


def test_cli_import_stays_light() -> None:
    # `codejepa --help` must not pay for torch, transformers or h5py: stage packages
    # re-export their API lazily and commands import heavy libraries when they run.
    code = (
        "import sys, codejepa.cli, codejepa.embed, codejepa.predict, codejepa.evaluate\n"
        "heavy = [m for m in ('torch', 'transformers', 'h5py') if m in sys.modules]\n"
        "sys.exit(f'imported: {heavy}' if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sigterm_stops_a_command_as_ctrl_c_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # Schedulers preempt with SIGTERM: each command's KeyboardInterrupt path keeps what is
    # finished and prints how to continue.
    import os
    import signal

    import codejepa.cli as cli

    monkeypatch.setattr(cli, "app", lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, before)
