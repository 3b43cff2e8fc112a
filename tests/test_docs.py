"""The documentation: the getting-started page's Python code runs as printed (the test reads the page as the site
build makes it, the README's included blocks in place), the included blocks are the README's, and no page (nor the
README) points outside the repository or to the project's issue tracker."""

import contextlib
import glob
import importlib.util
import io
import os
import re

import torch

from ik_fast.testing import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
OUTPUT = re.compile(r"^It prints[^\n]*\n\n```text\n(.*?)^```$", re.S | re.M)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _hooks():
    spec = importlib.util.spec_from_file_location("_ik_fast_docs_hooks", os.path.join(DOCS, "hooks.py"))
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def page(name: str) -> str:
    """A page's Markdown as the site build sees it: the README's blocks included (``docs/hooks.py``)."""
    with open(os.path.join(DOCS, name)) as f:
        return _hooks().include_readme(f.read())


def test_getting_started_code_runs_as_printed():
    text = page("getting-started.md")
    blocks = FENCE.findall(text)
    assert blocks, "no python code block on the getting-started page"
    namespace = {"__name__": "__docs__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "docs/getting-started.md", "exec"), namespace)
    printed = out.getvalue().splitlines()
    expected = OUTPUT.search(text)
    assert expected, "the getting-started page shows no output block after 'It prints'"
    expected = expected.group(1).splitlines()
    # the lines the page shows, up to the measured values
    assert [NUMBER.sub("#", line) for line in printed] == [NUMBER.sub("#", line) for line in expected], printed
    err = float(NUMBER.findall(printed[-1])[0])
    assert 0 <= err <= tolerance("equivariance", torch.float32, "SO3")  # (O(3), random elements)


def test_included_blocks_are_the_readmes():
    """Every ``<!-- include-readme: NAME -->`` of the docs names a README block, and the build puts that block, byte
    for byte, in its place (a wrong or missing name fails the build too)."""
    hooks = _hooks()
    with open(README) as f:
        readme = f.read()
    names = set()
    for path in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
        with open(path) as f:
            raw = f.read()
        found = hooks.INCLUDE.findall(raw)
        names.update(found)
        expanded = hooks.include_readme(raw)
        assert not hooks.INCLUDE.search(expanded), path
        for name in found:
            block = hooks.readme_block(name)
            assert block in readme and block in expanded, (path, name)
    # the quickstart and the install recipe, which tests read from the README, are the ones the site must not copy
    assert {"quickstart", "quickstart-output", "install-recipe"} <= names, names
    try:
        hooks.readme_block("no-such-block")
    except ValueError:
        pass
    else:
        raise AssertionError("readme_block accepted a name the README does not mark")


OUTSIDE = [
    (re.compile(r"\.\./shared|(?<![\w.])shared/"), "a path outside the repository"),
    (re.compile(r"\bissues? \d+|#\d{1,4}\b"), "an issue number"),
]


def test_pages_stay_inside_the_repository():
    found = []
    pages = sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
    for path in pages + [README, os.path.join(ROOT, "CHANGELOG.md")]:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                for pattern, what in OUTSIDE:
                    if pattern.search(line):
                        found.append(f"{os.path.relpath(path, ROOT)}:{n}: {what}: {line.strip()[:100]}")
    assert found == []


def test_api_reference_has_a_page_for_every_public_name():
    """The docs' hook finds every name of ik_fast.__all__ (and where it is defined) without importing the package."""
    import ik_fast

    hooks = _hooks()
    public = [n for n in ik_fast.__all__ if not n.startswith("__")]
    assert {"ImplicitPointConv", "ImplicitConv", "ImplicitKernel"} <= set(public)
    exports = hooks._exports()
    assert list(exports) == public
    for name, module in exports.items():
        assert getattr(importlib.import_module(module), name) is getattr(ik_fast, name), name
        assert f"api/{name}.md" in hooks._api_pages()
