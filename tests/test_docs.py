"""The documentation: the getting-started page's Python code runs as printed (the test reads the page itself), and no
page points outside the repository or to the project's issue tracker."""

import contextlib
import glob
import importlib.util
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def code_blocks(page: str):
    with open(os.path.join(DOCS, page)) as f:
        return FENCE.findall(f.read())


def test_getting_started_code_runs_as_printed():
    blocks = code_blocks("getting-started.md")
    assert blocks, "no python code block on the getting-started page"
    namespace = {"__name__": "__docs__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "docs/getting-started.md", "exec"), namespace)
    printed = out.getvalue()
    assert f"output: (100, {namespace['feat'].size})" in printed, printed
    err = float(re.search(r"equivariance error .*: (\S+)", printed).group(1))
    assert 0 <= err < 3e-2


OUTSIDE = [
    (re.compile(r"\.\./shared|(?<![\w.])shared/"), "a path outside the repository"),
    (re.compile(r"\bissues? \d+|#\d{1,4}\b"), "an issue number"),
]


def test_pages_stay_inside_the_repository():
    found = []
    for path in sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                for pattern, what in OUTSIDE:
                    if pattern.search(line):
                        found.append(f"{os.path.relpath(path, ROOT)}:{n}: {what}: {line.strip()[:100]}")
    assert found == []


def test_api_reference_has_a_page_for_every_public_name():
    """The docs' hook finds every name of ik_fast.__all__ (and where it is defined) without importing the package."""
    import ik_fast

    spec = importlib.util.spec_from_file_location("_ik_fast_docs_hooks", os.path.join(DOCS, "hooks.py"))
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    public = [n for n in ik_fast.__all__ if not n.startswith("__")]
    assert {"ImplicitPointConv", "ImplicitConv", "ImplicitKernel"} <= set(public)
    exports = hooks._exports()
    assert list(exports) == public
    for name, module in exports.items():
        assert getattr(importlib.import_module(module), name) is getattr(ik_fast, name), name
        assert f"api/{name}.md" in hooks._api_pages()
