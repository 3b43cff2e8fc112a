"""Measurement records: every file under benchmarks/results/ follows the one schema (ik_fast/records.py), sits in
<kind>/<device slug>/ and names the commit that measured it; the report renders every section from them."""

import importlib.util
import json
import os

import pytest
import torch

from ik_fast.testing import tolerance

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
    return {
        "kind": "timing",
        "commit": "0" * 40,
        "dirty": False,
        "date": "2026-12-01T00:00:00+00:00",
        "device": {"type": "cpu", "name": "Some CPU (2 threads)"},
        "stack": {"python": "3.11.7", "torch": "2.13.0"},
        "problem": "P",
        "provider": "native",
        "mode": "train",
        "precision": "ieee",
        "metric": "step_time",
        "value": 0.1,
        "unit": "s",
        "spread": None,
        "extra": {},
    }


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: r.update(commit="unknown"), "names no commit"),
        (lambda r: r.pop("dirty"), "lacks the field"),
        (lambda r: r.update(kind="work"), "in the folder 'timing'"),
        (lambda r: r["device"].update(name="Another CPU"), "in the folder"),
        (lambda r: r.update(value=None), "no value and no 'error'"),
    ],
)
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


# ----------------------------------------------------------------------------------------------------- the writers
# Each measurement tool writes this schema; the report renders what it writes.


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"_ik_fast_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _loaded(path):
    return [{**r, "_file": os.path.basename(str(path))} for r in report.records.load(str(path))]


PTXAS = """ptxas info    : Compiling entry function '_ZN12ik_fast_cuda1kIfEEvPKT_' for 'sm_90'
ptxas info    : Function properties for _ZN12ik_fast_cuda1kIfEEvPKT_
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 63 registers, used 1 barriers, 6144 bytes smem, 400 bytes cmem[0]
"""
SASS = """
Fatbin elf code:
================
arch = sm_90

\tcode for sm_90
\t\tFunction : _ZN12ik_fast_cuda1kIfEEvPKT_
        /*0000*/                   LDC R1, c[0x0][0x28] ;                        /* 0x00000a00ff017b82 */
        /*0010*/                   HMMA.1684.F32.TF32 R24, R160, R4, R24 ;        /* 0x000000040418723c */
        /*0020*/              @!P0 HMMA.1684.F32.TF32 R28, R160, R6, R28 ;        /* 0x000000060418723c */
        /*0030*/                   FFMA R2, R3, R4, R2 ;                          /* 0x0000000403027223 */
"""


def test_compile_check_records_of_a_native_kernel_follow_the_schema_and_render():
    cc = _bench_module("compile_check")
    (f,) = cc.parse_ptxas(PTXAS)
    assert (f["registers"], f["stack_bytes"], f["spill_stores"], f["shared_bytes"]) == (63, 8, 4, 6144)
    mma = cc.parse_sass(SASS)[("sm_90", f["mangled"])]
    assert mma == {"HMMA.1684.F32.TF32": 2}  # the predicated one too; FFMA is no tensor-core instruction
    prov = cc.arch_provenance(report.records.provenance("cpu"), 90, "nvcc 13.0")
    ident = {"kernel": "k<float>", "entry": 0, "file": "csrc/cuda/x.cu", "arch": "sm_90", "entry_function": True}
    values = {k: f[k] for k in ("registers", "stack_bytes", "spill_stores", "spill_loads", "shared_bytes")}
    recs = cc.kernel_records(prov, "k<float>", "native", values, ident, {"signature": "void k<float>()"}, mma=mma)
    recs += cc.kernel_records(prov, "csrc/cuda/y.cu", "native", {}, {**ident, "entry": 6}, {}, error="compile failed")
    for r in recs:
        report.records.validate_record(r)
    assert report.records.device_slug(recs[0]) == "sm-90"
    assert {r["metric"]: r["value"] for r in recs[:6]}["mma_instructions"] == 2
    text = report.render("compile", [{**r, "_file": "x.json"} for r in recs])
    assert "| `k<float>` | csrc/cuda/x.cu | 63 | 8 | 4 | 4 | 6,144 | 2 |" in text, text
    assert "failed: compile failed" in text


def test_precision_writes_records_and_the_report_renders_them(tmp_path):
    prec = _bench_module("precision")
    out = tmp_path / "precision.json"
    assert prec.main(["--problem", "tiny", "--backends", "torch", "--modes", "ieee", "--json", str(out)]) == 0
    recs = _loaded(out)
    assert sorted((r["mode"], r["metric"]) for r in recs) == sorted(
        (m, k) for m in ("train", "eval") for k in ("rel_error_out", "rel_error_grad_x", "rel_error_grad_params")
    )
    for r in recs:  # float32 against float64: the output and the gradients within the table's bounds
        kind = "forward" if r["metric"] == "rel_error_out" else "backward"
        assert r["kind"] == "precision" and r["precision"] == "ieee", r
        assert 0 < r["value"] <= tolerance(kind, torch.float32, backend=r["provider"]), r
    assert "| `torch` | " in report.render("precision", recs)


def test_precision_records_a_failing_case_without_a_value(tmp_path):
    prec = _bench_module("precision")
    out = tmp_path / "precision.json"
    assert prec.main(["--problem", "tiny", "--backends", "no-such-backend", "--modes", "ieee", "--json", str(out)]) == 1
    recs = _loaded(out)
    assert recs and all(r["value"] is None and "no-such-backend" in r["error"] for r in recs)


def test_workcount_writes_records_and_the_report_renders_them(tmp_path):
    from ik_fast.tools import workcount

    out = tmp_path / "work.json"
    assert workcount.main(["--problems", "tiny", "--backend", "torch", "--cached", "--json", str(out)]) == 0
    recs = _loaded(out)
    m = {r["metric"]: r for r in recs}
    assert set(m) == {"macs_per_edge", "aten_ops", "aten_ops_cached"}
    assert all(r["kind"] == "work" and r["provider"] == "torch" and r["mode"] == "train" for r in recs)
    assert m["macs_per_edge"]["value"] > 0 and m["macs_per_edge"]["extra"]["floor_per_edge"] > 0
    assert workcount.slope_rows(recs)[0]["macs_per_edge"] == m["macs_per_edge"]["value"]
    row = next(line for line in report.render("work", recs).splitlines() if line.startswith("| tiny |"))
    assert f"{m['macs_per_edge']['value']:,.0f}" in row and f"{m['aten_ops']['value']:.0f} /" in row


def test_trainer_writes_a_training_record_the_report_renders(tmp_path):
    from ik_fast.models.train import main

    out = tmp_path / "nb"
    assert (
        main(
            [
                "nbody",
                "--n-train",
                "10",
                "--n-val",
                "5",
                "--n-test",
                "5",
                "--batch-size",
                "5",
                "--epochs",
                "1",
                "--horizon",
                "20",
                "--num-layers",
                "1",
                "--num-features",
                "2",
                "--kernel-layers",
                "2",
                "--kernel-channels",
                "2",
                "--backend",
                "reference",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (rec,) = _loaded(out / "records.json")
    hist = json.loads((out / "history.json").read_text())
    assert (rec["kind"], rec["problem"], rec["provider"], rec["metric"]) == (
        "training",
        "nbody",
        "reference",
        "val_mse",
    )
    assert rec["value"] == hist["val_mse"] and rec["extra"]["baseline"] == hist["baseline_const"]
    row = next(line for line in report.render("training", [rec]).splitlines() if line.startswith("| `nbody`"))
    assert f"{rec['value'] / hist['baseline_const']:.2f}" in row


def test_measure_tolerances_writes_equivariance_records_the_report_renders(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "_ik_fast_measure_tolerances", os.path.join(ROOT, "scripts", "measure_tolerances.py")
    )
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    out = tmp_path / "eq.json"
    mt.main(["--seeds", "1", "--groups", "C8", "--json", str(out)])
    recs = _loaded(out)
    # a finite group: exact elements only, per dtype; named by the escnn call, as the migrated records are
    assert sorted((r["problem"], r["precision"], r["metric"]) for r in recs) == [
        ("rot2dOnR2(8)", p, "rel_error_exact_elements") for p in ("float32", "float64")
    ]
    assert all(r["kind"] == "equivariance" for r in recs)
    assert all(0 <= r["value"] <= tolerance("exact", getattr(torch, r["precision"])) for r in recs), recs
    assert "| `rot2dOnR2(8)` | float64 | – |" in report.render("equivariance", recs)
    grid = mt.grid_records(
        [
            {
                "grid": "paper",
                "grid_label": "paper",
                "G": 120,
                "quality": [34, 4.2],
                "seed": s,
                "exact": 1e-8,
                "random": v,
            }
            for s, v in ((0, 2e-3), (1, 9e-3))
        ],
        "cmd",
    )
    assert grid[0]["value"] == 9e-3 and grid[0]["spread"] == {"min": 2e-3, "max": 9e-3, "n": 2}
    assert "| `paper` | 120 | 2.0e-03–9.0e-03 |" in report.render("equivariance", [{**grid[0], "_file": "g.json"}])
