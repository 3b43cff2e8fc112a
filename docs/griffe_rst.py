"""A griffe extension for the API pages: the docstrings' reStructuredText habits shown as Markdown.

Sphinx roles (``:func:`name```) become code spans, and a simple table (rows between lines of ``===``) is kept as
preformatted text instead of being read as Markdown headings. The docstrings themselves are not changed.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|data|attr|mod|exc|obj|const):`~?([^`]+)`")
RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")


def markdown(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    lines, out, rules = text.split("\n"), [], 0
    for line in lines:
        if RULE.match(line):
            if rules == 0:
                out.append("```text")
            rules += 1
            out.append(line)
            if rules == 3:
                out.append("```")
                rules = 0
            continue
        out.append(line)
    if rules:
        out.append("```")
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
