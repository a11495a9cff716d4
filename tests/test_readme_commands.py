"""The commands of the README and of the benchmark report it links (``bench/RESULTS.md``)
against the real command line: every ``codejepa`` command names a
subcommand that exists and only options it takes (presets, baselines and spaces by their
names), every ``--set`` override is a valid config key and value, and
every ``python bench/….py`` option is one the script parses. Running them is the benchmark's
job (hours); this catches the drift that makes a copied command fail in its first second."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from codejepa.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "bench/RESULTS.md")


def _docs_text() -> str:
    return "\n".join((ROOT / doc).read_text() for doc in DOCS)


def _commands(prefix: str) -> list[str]:
    """Each shell command of the docs' code blocks that starts with ``prefix`` (after
    ``VAR=value`` assignments), with its continuation lines joined and its comment cut, and
    each inline code span that starts with it."""
    text = _docs_text()
    out = [m.group(1) for m in re.finditer(rf"`({re.escape(prefix)}[^`]+)`", text)]
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # B=... S=... codejepa ...
            for part in _split_commands(line):
                part = part.strip().removeprefix("do ").strip()
                if part.startswith(prefix):
                    out.append(part)
    return out


def _split_commands(line: str) -> list[str]:
    """``line`` cut at ``;``, ``&&`` and ``||``, except inside quotes and ``$(...)``: a loop in a
    substitution (``--run`` per run) stays part of the command whose options follow it."""
    parts, current, depth, quote, i = [], "", 0, "", 0
    while i < len(line):
        c = line[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif line.startswith("$(", i):
            depth += 1
            current, i = current + "$(", i + 2
            continue
        elif c == "(" and depth:
            depth += 1  # a bare ( inside a substitution closes at its own )
        elif c == ")" and depth:
            depth -= 1
        elif not depth and (c == ";" or line.startswith(("&&", "||"), i)):
            parts.append(current)
            current, i = "", i + (1 if c == ";" else 2)
            continue
        current += c
        i += 1
    return [*parts, current]


def _words(command: str) -> list[str]:
    # $(...) substitutions stand for more arguments: keep the options inside them too;
    # [--option VALUE] is an optional part of a usage line.
    flat = re.sub(r"\$\(|\)|\[|\]", " ", command)
    try:
        return shlex.split(flat)
    except ValueError:
        return flat.split()


def _click_commands() -> dict[tuple[str, ...], Any]:
    found: dict[tuple[str, ...], Any] = {}

    def walk(cmd: Any, path: tuple[str, ...]) -> None:  # typer's own click: duck-typed
        found[path] = cmd
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def _check_values(line: str, words: list[str]) -> None:
    """Option values the README spells out by name: presets, baselines, spaces."""
    from codejepa.evaluate.baselines import BASELINE_NAMES
    from codejepa.evaluate.spaces import SPACE_NAMES
    from codejepa.predict.config import PRESETS

    known = {"--preset": set(PRESETS), "--baselines": {*BASELINE_NAMES, "none", "all"}, "--space": {*SPACE_NAMES, "all"},
             "--spaces": {*SPACE_NAMES, "all"}}
    for opt, value in zip(words, words[1:]):
        if opt in known and not value.startswith(("$", "-", "NAME", "LIST")):
            for v in value.split(","):
                assert v in known[opt], f"README: `{line}`: {opt} {v} is not one of {sorted(known[opt])}"


def test_every_codejepa_command_in_the_readme_parses() -> None:
    commands = _click_commands()
    readme = _commands("codejepa ")
    assert len(readme) >= 20  # the README's stage sections and the benchmark's commands
    checked = set()
    for line in readme:
        words = _words(line)[1:]
        path: tuple[str, ...] = ()
        while words and (*path, words[0]) in commands:
            path, words = (*path, words[0]), words[1:]
        cmd = commands[path]
        assert not hasattr(cmd, "commands"), f"README: `{line}` names no subcommand of `codejepa {' '.join(path)}`"
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for w in words:
            if w.startswith("--"):
                name = w.split("=", 1)[0]
                assert name in opts, f"README: `{line}`: `codejepa {' '.join(path)}` has no option {name}"
        checked.add(path)
        _check_values(line, words)
    assert {("corpus", "build"), ("embed", "run"), ("predict", "train"), ("evaluate", "retrieval")} <= checked


def test_every_set_override_in_the_readme_is_a_valid_config_value() -> None:
    from codejepa.predict.config import PredictConfig, apply_overrides, parse_set
    from codejepa.predict.cross import parse_overrides

    text = _docs_text()
    items = sorted({m.group(1) for m in re.finditer(r"--set\s+([^\s`;]+)", text)} - {"section.key=value"})
    assert len(items) >= 5 and any("." not in i.split("=")[0] for i in items)
    for item in items:  # one at a time: each names the field it fails on
        if "." in item.split("=")[0]:
            apply_overrides(PredictConfig(), parse_set([item]))
        else:  # `predict cross` settings have no section
            parse_overrides([item])


@pytest.mark.parametrize("script", sorted({_words(c)[1] for c in _commands("python bench/")}))
def test_every_bench_option_in_the_readme_is_parsed(script: str) -> None:
    lines = [c for c in _commands("python bench/") if _words(c)[1] == script]
    assert (ROOT / script).is_file(), f"README names {script}, which does not exist"
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for line in lines:
        for w in _words(line)[2:]:
            if w.startswith("--"):
                name = w.split("=", 1)[0]
                assert re.search(rf"(^|[\s,\[]){re.escape(name)}\b", r.stdout), f"README: `{line}`: {script} has no {name}"


def test_commands_are_cut_only_outside_quotes_and_substitutions() -> None:
    line = "codejepa a $(for r in x y; do (echo --run $r); done) --b 'p;q' && codejepa c; d"
    assert _split_commands(line) == [
        "codejepa a $(for r in x y; do (echo --run $r); done) --b 'p;q' ", " codejepa c", " d"]
