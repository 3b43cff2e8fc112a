"""MkDocs hooks: the pages made from the repository when the site is built.

- API reference: one page per name of ``ik_fast.__all__`` (read from ``ik_fast/__init__.py`` without importing it,
  rendered from the module that defines the name)
  and one per public module in ``MODULES``, each rendered by mkdocstrings from the docstrings; the nav lists them.
- Benchmarks: a line ``<!-- report:SECTION -->`` in a page is replaced by that section of ``benchmarks/report.py``
  (tables from the records in ``benchmarks/results/``), and the timing plots are drawn into ``plots/``.
- Text shared with the README: a line ``<!-- include-readme: NAME -->`` in a page is replaced by the fenced block that
  follows README.md's marker line ``<!-- NAME -->`` (or ``<!-- NAME: a note -->``), e.g. the quickstart and the
  install recipe, which tests read from the README; so the site's copies cannot drift from what is tested.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "ik_fast.models",
    "ik_fast.models.nbody",
    "ik_fast.models.data",
    "ik_fast.models.qm9",
    "ik_fast.nn.convert",
    "ik_fast.nn.sync_bn",
    "ik_fast.testing",
    "ik_fast.backends",
    "ik_fast.ops",
    "ik_fast.tools.problems",
    "ik_fast.records",
]
MARKER = re.compile(r"^<!-- report:(\w+) -->$", re.M)
README = os.path.join(ROOT, "README.md")
INCLUDE = re.compile(r"^<!-- include-readme: ([\w-]+) -->$", re.M)
_state = {}


def _exports():
    """{public name: defining module} of ``ik_fast.__all__`` (dunder names left out), read from
    ``ik_fast/__init__.py`` without importing it: its ``from .module import name`` lines and the literal
    assignments (e.g. a ``{name: module}`` table of lazily imported names) that ``__all__`` is built from."""
    with open(os.path.join(ROOT, "ik_fast", "__init__.py")) as f:
        tree = ast.parse(f.read())
    where, literals, names = {}, {}, None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                where[alias.asname or alias.name] = node.module
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
            if target == "__all__":
                names = eval(
                    compile(ast.Expression(node.value), "ik_fast/__init__.py", "eval"),  # noqa: S307
                    {"__builtins__": {}},
                    dict(literals),
                )
            else:
                try:
                    literals[target] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    if names is None:
        raise RuntimeError("ik_fast/__init__.py defines no __all__")
    for value in literals.values():  # a {name: submodule} table of lazy exports
        if isinstance(value, dict):
            where.update({k: v for k, v in value.items() if isinstance(v, str) and k not in where})
    missing = [n for n in names if not n.startswith("__") and n not in where]
    if missing:
        raise RuntimeError(f"cannot tell which module defines {missing} from ik_fast/__init__.py")
    return {n: f"ik_fast.{where[n]}" for n in names if not n.startswith("__")}


def readme_block(name: str, text: str = None) -> str:
    """The fenced block (fences included) right after README.md's marker line ``<!-- NAME -->`` or
    ``<!-- NAME: note -->``; a ``ValueError`` when there is none."""
    if text is None:
        with open(README) as f:
            text = f.read()
    pattern = r"^<!-- " + re.escape(name) + r"(?::[^\n]*)? -->\n(```[^\n]*\n.*?^```)$"
    m = re.search(pattern, text, re.M | re.S)
    if m is None:
        raise ValueError(f"README.md has no fenced block right after a '<!-- {name} -->' marker line")
    return m.group(1)


def include_readme(markdown: str) -> str:
    """``markdown`` with every ``<!-- include-readme: NAME -->`` line replaced by the README's block NAME."""
    return INCLUDE.sub(lambda m: readme_block(m.group(1)), markdown)


def public_names():
    """``ik_fast.__all__`` without the dunder names."""
    return list(_exports())


def _report():
    spec = importlib.util.spec_from_file_location("_ik_fast_report", os.path.join(ROOT, "benchmarks", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _api_pages():
    pages = {"api/index.md": _api_index()}
    for name, module in _exports().items():
        pages[f"api/{name}.md"] = (
            f"::: {module}.{name}\n    options:\n      heading_level: 1\n"
            f"      heading: ik_fast.{name}\n\nDefined in `{module}`.\n"
        )
    for mod in MODULES:
        pages[f"api/{mod}.md"] = f"::: {mod}\n    options:\n      heading_level: 1\n"
    return pages


def _api_index():
    names = "\n".join(f"- [`ik_fast.{n}`]({n}.md)" for n in public_names())
    mods = "\n".join(f"- [`{m}`]({m}.md)" for m in MODULES)
    return (
        "# API reference\n\nGenerated from the docstrings. The package's public names (`ik_fast.__all__`; "
        "`ik_fast.__version__` is the version string, defined once in `ik_fast/_version.py`):\n\n"
        f"{names}\n\nModules:\n\n{mods}\n"
    )


def on_config(config):
    nav = []
    for entry in config["nav"]:
        if isinstance(entry, dict) and "API reference" in entry:
            api = [{"Overview": "api/index.md"}] + [{n: f"api/{n}.md"} for n in public_names()]
            api += [{m: f"api/{m}.md"} for m in MODULES]
            entry = {"API reference": api}
        nav.append(entry)
    config["nav"] = nav
    config["watch"].append(README)  # mkdocs serve: the included README blocks reload too
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, text in _api_pages().items():
        files.append(File.generated(config, path, content=text))
    report = _report()
    recs = report.load_all()
    with tempfile.TemporaryDirectory() as tmp:
        sections = {
            s: report.render(s, recs, plot_dir=tmp if s == "timing" else None, plot_prefix="plots/")
            for s in report.SECTIONS
        }
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                files.append(File.generated(config, f"plots/{name}", content=f.read()))
    _state["sections"] = sections
    return files


def on_page_markdown(markdown, page, config, files):
    def sub(m):
        name = m.group(1)
        if name not in _state["sections"]:
            raise ValueError(f"{page.file.src_uri}: unknown report section {name!r}")
        return _state["sections"][name]

    return MARKER.sub(sub, include_readme(markdown))
