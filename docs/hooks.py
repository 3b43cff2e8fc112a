"""MkDocs hooks: the pages made from the repository when the site is built.

- API reference: one page per name of ``ik_fast.__all__`` (read from ``ik_fast/__init__.py`` without importing it)
  and one per public module in ``MODULES``, each rendered by mkdocstrings from the docstrings; the nav lists them.
- Benchmarks: a line ``<!-- report:SECTION -->`` in a page is replaced by that section of ``benchmarks/report.py``
  (tables from the records in ``benchmarks/results/``), and the timing plots are drawn into ``plots/``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import tempfile

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["ik_fast.models", "ik_fast.nbody", "ik_fast.data", "ik_fast.qm9", "ik_fast.convert", "ik_fast.sync_bn",
           "ik_fast.testing", "ik_fast.backends", "ik_fast.ops", "ik_fast.problems", "ik_fast.records"]
MARKER = re.compile(r"^<!-- report:(\w+) -->$", re.M)
_state = {}


def public_names():
    """``ik_fast.__all__`` as written in ``ik_fast/__init__.py``, without the dunder names."""
    with open(os.path.join(ROOT, "ik_fast", "__init__.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [n for n in ast.literal_eval(node.value) if not n.startswith("__")]
    raise RuntimeError("ik_fast/__init__.py defines no __all__")


def _report():
    spec = importlib.util.spec_from_file_location("_ik_fast_report", os.path.join(ROOT, "benchmarks", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _api_pages():
    pages = {"api/index.md": _api_index()}
    for name in public_names():
        pages[f"api/{name}.md"] = f"::: ik_fast.{name}\n    options:\n      heading_level: 1\n"
    for mod in MODULES:
        pages[f"api/{mod}.md"] = f"::: {mod}\n    options:\n      heading_level: 1\n"
    return pages


def _api_index():
    names = "\n".join(f"- [`ik_fast.{n}`]({n}.md)" for n in public_names())
    mods = "\n".join(f"- [`{m}`]({m}.md)" for m in MODULES)
    return ("# API reference\n\nGenerated from the docstrings. The package's public names (`ik_fast.__all__`; "
            "`ik_fast.__version__` is the version string, defined once in `ik_fast/_version.py`):\n\n"
            f"{names}\n\nModules:\n\n{mods}\n")


def on_config(config):
    nav = []
    for entry in config["nav"]:
        if isinstance(entry, dict) and "API reference" in entry:
            api = [{"Overview": "api/index.md"}] + [{n: f"api/{n}.md"} for n in public_names()]
            api += [{m: f"api/{m}.md"} for m in MODULES]
            entry = {"API reference": api}
        nav.append(entry)
    config["nav"] = nav
    return config


def on_files(files, config):
    for path, text in _api_pages().items():
        files.append(File.generated(config, path, content=text))
    report = _report()
    recs = report.load_all()
    with tempfile.TemporaryDirectory() as tmp:
        sections = {s: report.render(s, recs, plot_dir=tmp if s == "timing" else None, plot_prefix="plots/")
                    for s in report.SECTIONS}
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

    return MARKER.sub(sub, markdown)
