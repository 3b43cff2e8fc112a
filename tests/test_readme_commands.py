"""The README's commands and links, checked as written.

Every command of the README's ```bash blocks (split at ``&&``, ``;`` and ``|``, comments and ``VAR=value`` prefixes
removed) is checked by what it calls, and a command this test does not know fails it, so a new kind of command needs a
check here:

- ``bash SCRIPT ARGS``: the script exists and ``bash -n`` parses it; a ``scripts/run.sh`` subcommand is one of its
  ``case`` branches, an option of another script (``--rehearse``) appears in the script's text; after
  ``run.sh test``, pytest's ``-m MARKER`` names a marker declared in ``pyproject.toml`` and ``-k WORD`` a word that
  occurs in a test's name;
- ``python [-P] -m MODULE ARGS``: the module's file exists in the checkout; for the modules whose ``--help`` is quick
  (``FAST_HELP``: no torch import, well under a second) ``--help`` runs with exit status 0, and every option the
  README passes is one that help lists;
- ``python FILE ARGS``: the file exists;
- ``pip install ...``: every requirement parses, a local path exists; in the install recipe (the block after
  ``<!-- install-recipe -->``, which installs ik_fast with ``--no-deps``) every dependency that ``pyproject.toml``
  declares is installed by an earlier line, and every ``==`` pin satisfies the declared range.

Not run here, because they take minutes: ``bash scripts/run.sh demo|test|bench`` (they set up a venv, train, run the
suite), the install recipe itself (``tests/test_install.py``, ``-m install``, about 10 minutes), the linters and the
docs build (``.ci/run`` runs both), ``benchmarks/run_gpu.sh`` (minutes; ``.ci/run`` runs its rehearsal). The
quickstart's Python block runs in ``tests/test_readme.py``.

Links: every link and image of the README that is not a web address names a file of the repository that exists (and,
for a Markdown file with ``#anchor``, a heading of it); no link points outside the repository or to an issue.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FAST_HELP = {"ik_fast.tools.bench", "ik_fast.build"}
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _text() -> str:
    return README.read_text()


def _commands(block: str):
    """(line, argv) of each command of a bash block."""
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        cmd = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "|", "||"):
                while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append((line, cmd))
                cmd = []
            else:
                cmd.append(w)
    return out


def _readme_commands():
    return [c for block in BASH_BLOCK.findall(_text()) for c in _commands(block)]


def _markers():
    with open(ROOT / "pyproject.toml", "rb") as f:
        markers = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
    return {m.split(":")[0].strip() for m in markers}


def _test_names() -> str:
    """Every test file's name and every function and class name defined in the test files, one per line."""
    names = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        names.append(path.stem)
        names += re.findall(r"^\s*(?:def|class) (\w+)", path.read_text(), re.M)
    return "\n".join(names)


def _check_pytest_args(line: str, args, problems):
    markers = _markers()
    names = _test_names()
    for opt, value in zip(args, args[1:]):
        if opt == "-m":
            for word in re.findall(r"\w+", value):
                if word not in ("and", "or", "not") and word not in markers:
                    problems.append(f"{line!r}: marker {word!r} is not declared in pyproject.toml")
        elif opt == "-k":
            for word in re.findall(r"\w+", value):
                if word not in ("and", "or", "not") and word not in names:
                    problems.append(f"{line!r}: no test name contains {word!r}")


def _check_bash(line: str, argv, problems):
    script = ROOT / argv[1]
    if not script.is_file():
        problems.append(f"{line!r}: {argv[1]} does not exist")
        return
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        problems.append(f"{line!r}: bash -n {argv[1]}: {r.stderr.strip()}")
    text = script.read_text()
    args = argv[2:]
    if argv[1] == "scripts/run.sh":
        branches = set(re.findall(r"^\s*([a-z]+)\)", text, re.M))
        sub = args[0] if args else "test"
        if sub not in branches:
            problems.append(f"{line!r}: scripts/run.sh has no subcommand {sub!r} (it has {sorted(branches)})")
        if sub == "test":
            _check_pytest_args(line, args[1:], problems)
    else:
        for a in args:
            if a.startswith("-") and a not in text:
                problems.append(f"{line!r}: {argv[1]} does not mention the option {a}")


def _module_file(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def _check_python(line: str, argv, problems, helps):
    args = argv[1:]
    while args and args[0].startswith("-") and args[0] != "-m":  # the interpreter's own flags (-P, -u, ...)
        args = args[1:]
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module == "pytest":
            _check_pytest_args(line, rest, problems)
            return
        if not _module_file(module):
            problems.append(f"{line!r}: no module {module} in the checkout")
            return
        if module in FAST_HELP:
            if module not in helps:
                r = subprocess.run(
                    [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
                )
                assert r.returncode == 0, f"python -m {module} --help: exit status {r.returncode}\n{r.stderr}"
                helps[module] = r.stdout
            for a in rest:
                if a.startswith("-") and not re.search(
                    r"(?<![\w-])" + re.escape(a.split("=")[0]) + r"\b", helps[module]
                ):
                    problems.append(f"{line!r}: python -m {module} --help lists no option {a}")
        return
    if not args or not (ROOT / args[0]).is_file():
        problems.append(f"{line!r}: no such file: {args[:1]}")


def _check_pip(line: str, argv, problems):
    """The requirements a ``pip install`` line installs ({name: Requirement}); problems appended."""
    installed = {}
    args = argv[2:]
    skip_next = False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if a in ("--index-url", "--extra-index-url", "-i", "--target", "-t", "-r", "-c"):
            skip_next = True
            continue
        if a.startswith("-"):
            continue
        if a.startswith((".", "/")):
            if not (ROOT / a / "pyproject.toml").is_file():
                problems.append(f"{line!r}: {a} is not a project folder of the repository")
            continue
        try:
            req = Requirement(a)
        except InvalidRequirement as e:
            problems.append(f"{line!r}: {a!r} is not a requirement: {e}")
            continue
        installed[canonicalize_name(req.name)] = req
    return installed


def test_every_readme_command_is_valid():
    commands = _readme_commands()
    assert len(commands) >= 8, commands  # the two commands, the install recipe, the test commands
    problems, helps = [], {}
    for line, argv in commands:
        prog = argv[0]
        if prog == "bash":
            _check_bash(line, argv, problems)
        elif prog in ("python", "python3"):
            _check_python(line, argv, problems, helps)
        elif prog == "pip" and argv[1:2] == ["install"]:
            _check_pip(line, argv, problems)
        else:
            problems.append(f"{line!r}: no check for {prog!r} commands in {__file__}")
    assert problems == [], "\n".join(problems)
    # the fast modules' help did run
    assert FAST_HELP & set(helps), helps


def test_install_recipe_installs_every_declared_dependency():
    m = re.search(r"<!-- install-recipe -->\s*```bash\n(.*?)\n```", _text(), re.S)
    assert m, "no bash block after <!-- install-recipe --> in README.md"
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = {
            canonicalize_name(Requirement(d).name): Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]
        }
    installed, problems, project_line = {}, [], None
    for line, argv in _commands(m.group(1)):
        if argv[:2] == ["pip", "install"]:
            if "." in argv:
                project_line = argv
                assert "--no-deps" in argv, (
                    "the recipe installs ik_fast with its dependencies from PyPI (py3nj needs Fortran)"
                )
                missing = sorted(set(declared) - set(installed))
                assert missing == [], f"the recipe installs ik_fast --no-deps before installing {missing}"
            installed.update(_check_pip(line, argv, problems))
    assert project_line is not None, "the recipe does not install the project (pip install ... .)"
    for name, req in installed.items():
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if name in declared and pins and not declared[name].specifier.contains(pins[0], prereleases=True):
            problems.append(f"the recipe pins {req}, outside pyproject.toml's {declared[name]}")
    assert problems == [], "\n".join(problems)


def _anchors(md: Path):
    """GitHub's (and MkDocs') anchors of a Markdown file's headings."""
    out = set()
    for h in re.findall(r"^#+ (.+)$", md.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_readme_links_name_files_of_the_repository():
    links = LINK.findall(_text())
    assert links, "the README links nothing"
    problems = []
    for target in links:
        if re.match(r"https?://", target):
            if re.search(r"/(issues|pull)/\d+", target):
                problems.append(f"{target}: a link to an issue")
            continue
        path, _, anchor = target.partition("#")
        resolved = (ROOT / path).resolve()
        if ROOT not in resolved.parents and resolved != ROOT:
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{target}: {path} has no heading #{anchor}")
    assert problems == [], "\n".join(problems)


def test_the_checks_catch_what_they_are_for():
    """The checks above fail on what they look for (so that they can fail)."""
    problems, helps = [], {}
    _check_bash("x", ["bash", "scripts/no-such-script.sh"], problems)
    _check_bash("x", ["bash", "scripts/run.sh", "tset"], problems)
    _check_bash("x", ["bash", "scripts/run.sh", "test", "-m", "nosuchmarker"], problems)
    _check_bash("x", ["bash", "scripts/run.sh", "test", "-k", "nosuchtestword"], problems)
    _check_bash("x", ["bash", "benchmarks/run_gpu.sh", "--no-such-option"], problems)
    _check_python("x", ["python", "-m", "ik_fast.no_such_module"], problems, helps)
    _check_python("x", ["python", "-m", "ik_fast.tools.bench", "--no-such-option"], problems, helps)
    _check_python("x", ["python", "benchmarks/no_such_file.py"], problems, helps)
    _check_pip("x", ["pip", "install", "./no-such-folder", "numpy>>1"], problems)
    assert len(problems) == 10, "\n".join(problems)
    assert _commands("A=1 bash x.sh --y && python -m m  # note") == [
        ("A=1 bash x.sh --y && python -m m  # note", ["bash", "x.sh", "--y"]),
        ("A=1 bash x.sh --y && python -m m  # note", ["python", "-m", "m"]),
    ]
    assert "torchcompile" in _anchors(ROOT / "docs" / "backends.md")
