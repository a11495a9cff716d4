"""Fixture git repositories for the corpus tests, made with the git CLI in tmp_path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_repo(path: Path, files: dict[str, bytes | str], *, message: str = "init") -> str:
    """Create (or add a commit to) a git repo with ``files``; returns the commit SHA.

    A value starting with ``"->"`` becomes a symlink to the rest of the string.
    """
    if not (path / ".git").exists():
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "-q", "-b", "main")
    for rel, content in files.items():
        p = path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("->"):
            if p.is_symlink() or p.exists():
                p.unlink()
            os.symlink(content[2:], p)
        else:
            p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    git(path, "add", "-A")
    git(path, "commit", "-q", "--allow-empty", "-m", message)
    return git(path, "rev-parse", "HEAD")


# The main fixture: every construct the extractor must get right, as exact bytes.
MAIN_PY = (
    "import os\n"
    "from typing import (\n    Any,\n)\n"
    "\n"
    "@decorator\n"
    "@other.decorator(arg=1)\n"
    "def decorated(a, b=2) -> int:\n"
    '    """Docstring."""\n'
    "    # comment after the docstring belongs to the body\n"
    "    return a + b\n"
    "\n"
    "async def fetch(url):  # header comment belongs to the body\n"
    "    await something(url)\n"
    "\n"
    "def one_liner(x): return x * 2\n"
    "\n"
    "def doc_only():\n"
    '    """Only a docstring."""\n'
    "\n"
    "def fstring_first():\n"
    '    f"not a docstring {1}"\n'
    "    return 1\n"
    "\n"
    "def trivial():\n"
    "    pass\n"
    "\n"
    "class Outer(Base, metaclass=Meta):\n"
    '    """Class doc."""\n'
    "\n"
    "    class Inner:\n"
    "        @property\n"
    "        def value(self):\n"
    "            return 42\n"
    "\n"
    "    def method(self):\n"
    "        def helper():\n"
    "            class Local:\n"
    "                def deep(self):\n"
    "                    return 'deep'\n"
    "            return Local\n"
    "        return helper\n"
    "\n"
    "    @staticmethod\n"
    "    async def amethod():\n"
    "        raise NotImplementedError\n"
    "\n"
    "if os.name == 'nt':\n"
    "    import ntpath\n"
    "    def conditional():\n"
    "        return ntpath\n"
)

EXPECTED_MAIN = {
    # qualname: (def line, is_async)
    "decorated": (8, False),
    "fetch": (13, True),
    "one_liner": (16, False),
    "doc_only": (18, False),
    "fstring_first": (21, False),
    "trivial": (25, False),
    "Outer.Inner.value": (33, False),
    "Outer.method": (36, False),
    "Outer.method.<locals>.helper": (37, False),
    "Outer.method.<locals>.helper.<locals>.Local.deep": (39, False),
    "Outer.amethod": (45, True),
    "conditional": (50, False),
}

UNICODE_PY = (
    "# -*- coding: utf-8 -*-\n"
    "def grüße(naïve='ünïcödé 🎉'):\n"
    "    café = 'é' * 3  # コメント\n"
    "    return café + naïve\n"
    "\n"
    "class Ñandú:\n"
    "    def méthode(self): return '中文'\n"
)

CRLF_PY = "def windows(a):\r\n    '''Doc.'''\r\n    x = a\r\n    return x\r\n\r\ndef second():\r\n    return 2\r\n"

SYNTAX_ERROR_PY = (
    "def good_before():\n"
    "    return 1\n"
    "\n"
    "def broken(:\n"
    "    return 2\n"
    "\n"
    "def good_after():\n"
    "    return 3\n"
)

# Latin-1 bytes with a coding line: decodes; without one: must be reported, not guessed.
LATIN1_DECLARED = b"# -*- coding: latin-1 -*-\ndef caf\xe9():\n    return '\xe9t\xe9'\n\ndef after():\n    return 'ok'\n"
LATIN1_UNDECLARED = b"def f():\n    return '\xe9t\xe9'\n"

BINARY_PY = b"\x00\x01\x02binary\x00data\xff\xfe"

TESTS_PY = "def test_something():\n    assert True\n\ndef helper():\n    return 1\n"
TEST_CLASS_PY = "class TestThing:\n    def check(self):\n        return 2\n\ndef regular():\n    return 3\n"


def fixture_files() -> dict[str, bytes | str]:
    return {
        "pkg/__init__.py": "",
        "pkg/main.py": MAIN_PY,
        "pkg/unicode_names.py": UNICODE_PY,
        "pkg/crlf.py": CRLF_PY,
        "pkg/broken.py": SYNTAX_ERROR_PY,
        "pkg/latin1_declared.py": LATIN1_DECLARED,
        "pkg/latin1_undeclared.py": LATIN1_UNDECLARED,
        "pkg/binary.py": BINARY_PY,
        "pkg/things.py": TEST_CLASS_PY,
        "tests/test_main.py": TESTS_PY,
        "README.md": "not python\n",
        "pkg/link_inside.py": "->main.py",
        "pkg/link_outside.py": "->../../../../etc/passwd.py",
    }
