"""The README's quickstart, run verbatim: the code block after the ``<!-- quickstart: ... -->`` marker, its output
compared with the block after ``<!-- quickstart-output -->`` (the test and the README read the same text). And the
README's results table: the summary that ``benchmarks/report.py`` renders from the newest records, not typed."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import torch

from ik_fast.testing import tolerance

README = Path(__file__).resolve().parent.parent / "README.md"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _block(marker: str, lang: str) -> str:
    text = README.read_text()
    m = re.search(re.escape(marker) + r"[^\n]*-->\n```" + lang + r"\n(.*?)```", text, re.S)
    assert m, f"README.md has no ```{lang} block after a {marker!r} marker"
    return m.group(1)


def _shape(line: str):
    """The line with every number replaced by a placeholder, and its numbers."""
    return NUMBER.sub("#", line), [float(n) for n in NUMBER.findall(line)]


def test_quickstart_runs_verbatim_and_prints_what_the_readme_shows(capsys):
    code = _block("<!-- quickstart:", "python")
    expected = _block("<!-- quickstart-output", "text").splitlines()
    capsys.readouterr()
    exec(compile(code, f"{README}:quickstart", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out.splitlines()
    # nothing else on stdout (escnn's debug lines among them), and each line as shown, up to the numbers' values
    assert len(printed) == len(expected), printed
    for got, want in zip(printed, expected):
        (got_text, got_nums), (want_text, want_nums) = _shape(got), _shape(want)
        assert got_text == want_text, (got, want)
        # integers (sizes, the group's name, the number of elements) exactly; measured values as finite numbers
        for g, w, token in zip(got_nums, want_nums, NUMBER.findall(want)):
            assert math.isfinite(g), got
            if re.fullmatch(r"-?\d+", token):
                assert g == w, (got, want)
    err = _shape(printed[-1])[1][0]
    assert 0 <= err <= tolerance("equivariance", torch.float32, "SO3")  # (O(3), random elements)


def test_results_block_is_the_reports_summary_of_the_newest_records():
    """The block between the results markers is exactly what ``python benchmarks/report.py --readme`` writes from
    ``benchmarks/results/`` now: a new record, or a hand edit, fails here until the report rewrites the block."""
    path = README.parent / "benchmarks" / "report.py"
    spec = importlib.util.spec_from_file_location("_ik_fast_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    text = README.read_text()
    assert text.count(report.START) == 1 and text.count(report.END) == 1, "README.md needs one results block"
    block = text[text.index(report.START) : text.index(report.END) + len(report.END)]
    expected = f"{report.START}\n{report.render('summary')}\n{report.END}"
    assert block == expected, "README.md's results block is stale: run python benchmarks/report.py --readme"
    # every figure names the commit that measured it
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows and all(
        re.search(r" `[0-9a-f]{7}\*?`$", cell.strip(" |"))
        for row in rows
        for cell in row.split(" | ")[2:]
        if cell.strip(" |")
    )
