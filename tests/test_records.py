"""Measurement records: every file under benchmarks/results/ follows the one schema (ik_fast/records.py), sits in
<kind>/<device slug>/ and names the commit that measured it; the report renders every section from them."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report():
    spec = importlib.util.spec_from_file_location("_ik_fast_report", os.path.join(ROOT, "benchmarks", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _report()


def test_every_results_file_follows_the_schema_and_names_its_commit():
    assert report.result_files(), "no results files found"
    assert report.check_tree() == []


def _good_record():
    return {"kind": "timing", "commit": "0" * 40, "dirty": False, "date": "2026-12-01T00:00:00+00:00",
            "device": {"type": "cpu", "name": "Some CPU (2 threads)"},
            "stack": {"python": "3.11.7", "torch": "2.13.0"}, "problem": "P", "provider": "native", "mode": "train",
            "precision": "ieee", "metric": "step_time", "value": 0.1, "unit": "s", "spread": None, "extra": {}}


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.update(commit="unknown"), "names no commit"),
    (lambda r: r.pop("dirty"), "lacks the field"),
    (lambda r: r.update(kind="work"), "in the folder 'timing'"),
    (lambda r: r["device"].update(name="Another CPU"), "in the folder"),
    (lambda r: r.update(value=None), "no value and no 'error'"),
])
def test_check_tree_finds_a_broken_record(tmp_path, monkeypatch, breakage, message):
    rec = _good_record()
    folder = tmp_path / "timing" / "cpu-some-cpu"
    folder.mkdir(parents=True)
    (folder / "ok.json").write_text(json.dumps({"schema": report.records.SCHEMA, "records": [rec]}))
    monkeypatch.setattr(report, "_known_commits", lambda: None)  # the fake commit is in no history
    assert report.check_tree(str(tmp_path)) == []
    bad = _good_record()
    breakage(bad)
    (folder / "bad.json").write_text(json.dumps({"schema": report.records.SCHEMA, "records": [bad]}))
    found = report.check_tree(str(tmp_path))
    assert len(found) == 1 and message in found[0], found


def test_a_stray_file_is_found(tmp_path):
    (tmp_path / "plot.png").write_bytes(b"\x89PNG")
    assert report.check_tree(str(tmp_path)) == ["plot.png: not <kind>/<device slug>/<name>.json"]


def test_report_renders_every_section_with_every_provider_and_commit():
    recs = report.load_all()
    timing = report.render("timing", recs)
    for p in {r["provider"] for r in recs if r["kind"] == "timing"}:
        assert f"| {p} |" in timing, p
    rows = [line for line in timing.splitlines() if line.startswith("| ") and not line.startswith("| problem")]
    commits = {r["commit"][:7] for r in recs}
    assert rows and all(any(c in row for c in commits) for row in rows)
    for section in report.SECTIONS:
        assert not report.render(section, recs).startswith("No "), section


def test_plots_draw_every_cpu_provider(tmp_path):
    """The speedup plot of each CPU device draws every provider with timing records on it (native included)."""
    recs = report.load_all()
    for dev, dev_recs in report._timing(recs).items():
        if dev_recs[0]["device"]["type"] != "cpu":
            continue
        cases = report._cases(dev_recs)
        made = dict(report.plots(dev, cases, str(tmp_path)))
        speedup = [p for p in made if p.endswith("-speedup.png")]
        assert speedup and os.path.getsize(speedup[0]) > 0
        assert set(made[speedup[0]]) == {r["provider"] for r in dev_recs}, dev
