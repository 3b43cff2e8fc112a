"""A tiny smoke run of the benchmark harness (the full suite is not part of the tests)."""

import time

import pytest
import torch

from ik_fast.tools import bench
from ik_fast.tools.problems import PROBLEMS, get_problem


@pytest.mark.parametrize("provider", ["escnn", "reference", "torch", "triton"])
@pytest.mark.parametrize("mode", bench.MODES)
def test_measure_tiny(mode, provider):
    if provider == "triton" and "triton" not in bench._available():
        pytest.skip("Triton not available")
    rec = bench.measure("tiny", provider, mode, repeats=1, warmup=0, min_time_s=0)
    assert rec["time_s"] > 0 and rec["flops"] > 0 and rec["edges"] == 64 * 8
    assert rec["peak_rss_mb"] > 0 and rec["warmup_s"] > 0


def test_suites_share_the_problem_list():
    from ik_fast.tools.problems import get_problem

    for suite in bench.suites().values():
        for name in suite["problems"]:
            get_problem(name)  # every suite problem comes from the one list


def test_skewed_graph_has_a_hub():
    from ik_fast.models.data import skewed_graph

    pos, ei = skewed_graph(3000, 8, hub_degree=2000)
    deg = ei[1].bincount(minlength=3000)
    assert deg.max() == 2000 and deg.min() >= 1 and ei[0].max() < 3000


def test_cli_child_process(tmp_path):
    """The command line: each case in a child process, the results file in the records schema (a step_time and a
    peak_memory record per case, with the commit, device and stack), written again under --copy-to."""
    from ik_fast import records

    out, copy = tmp_path / "r.json", tmp_path / "copy"
    assert (
        bench.main(
            [
                "--problems",
                "tiny",
                "--providers",
                "reference,torch",
                "--modes",
                "train",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--min-time",
                "0",
                "--out",
                str(out),
                "--copy-to",
                str(copy),
            ]
        )
        == 0
    )
    recs = records.load(str(out))
    assert records.load(str(copy / "r.json")) == recs
    assert {(r["provider"], r["metric"]) for r in recs} == {
        (p, m) for p in ("reference", "torch") for m in ("step_time", "peak_memory")
    }
    assert all(r.get("error") is None and r["value"] > 0 for r in recs), recs
    assert all(r["device"]["type"] == "cpu" and r["precision"] == "ieee" and r["kind"] == "timing" for r in recs)
    assert all(r["extra"]["edges"] == 64 * 8 for r in recs)


def test_cli_budget_stops_a_running_case_and_skips_the_rest(tmp_path, monkeypatch):
    """--budget-s bounds the whole run: the case running when it is spent is killed (its child process), the cases
    after it are recorded as skipped, and the file holds every case's record."""
    out = tmp_path / "r.json"
    t = time.time()
    # a layer step far beyond the budget: the 'cpu' problem in Triton's interpreter takes minutes
    assert (
        bench.main(
            [
                "--problems",
                "cpu",
                "--providers",
                "triton,reference",
                "--modes",
                "train",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--min-time",
                "0",
                "--budget-s",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert time.time() - t < 60
    from ik_fast import records

    recs = records.load(str(out))
    assert [(r["provider"], r["error"].split(":")[0].split(" after")[0]) for r in recs] == [
        ("triton", "stopped"),
        ("reference", "skipped"),
    ]
    assert recs[0]["value"] is None and "time budget (4 s)" in recs[0]["error"]


def test_cli_skips_a_problem_whose_data_is_missing(tmp_path, monkeypatch):
    """A problem that needs data not installed here is recorded as skipped with the reason; the run goes on."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a))
    cases = [
        dict(problem=p, provider="reference", mode="train", repeats=1, warmup=0, min_time_s=0)
        for p in ("qm9-400", "tiny")
    ]
    recs = bench.run_cases(cases, timeout=600)
    assert recs[0]["error"].startswith("skipped: needs the QM9 data of the qm9pack package")
    assert "error" not in recs[1] and recs[1]["time_s"] > 0


def test_cli_rejects_bad_options_naming_them(capsys):
    for argv, name in [
        (["--problems", "nope"], "--problems"),
        (["--modes", "walk"], "--modes"),
        (["--precision", "medium"], "--precision"),
        (["--budget-s", "0"], "--budget-s"),
        (["--repeats", "0"], "--repeats"),
    ]:
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert name in capsys.readouterr().err, argv


def test_help_is_fast_and_lists_every_problem():
    """``python -m ik_fast.tools.bench --help`` imports neither torch nor escnn, describes every option and lists the
    problem names."""
    import subprocess
    import sys

    t = time.time()
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ik_fast.tools.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    imported = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert not {"torch", "escnn", "numpy"} & imported, sorted({"torch", "escnn", "numpy"} & imported)
    for name in PROBLEMS:
        assert f"\n  {name} " in res.stdout, name
    options = [a for a in bench._parser()._actions if a.help != "==SUPPRESS=="]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    print(f"--help: {time.time() - t:.2f} s")


def test_problem_list():
    assert {"cpu", "P", "M", "H"} <= set(PROBLEMS)
    assert get_problem("H").field_dim == 144 and get_problem("M").field_dim == 32
    assert get_problem("M@1024").nodes == 1024
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("Q")


def test_field_dims_match_the_field_types():
    from ik_fast.tools.problems import field_types

    for name in ("cpu", "P", "planar", "tiny"):
        p = get_problem(name)
        assert field_types(p)[0].size == p.field_dim, name


def test_qm9_batch_is_real_data():
    from ik_fast.models.data import molecule_batch, qm9_molecules

    mols = qm9_molecules(3)
    assert [m[0].shape[0] for m in mols] == [5, 4, 3]  # CH4, NH3, H2O: the first QM9 entries
    pos, typ, ei, attr = molecule_batch(mols)
    assert ei.shape[1] == 25 + 16 + 9 and attr.shape == (50, 4)
    batch = qm9_molecules(32)  # problem P's batch, which has numbers written as 1.2*^-6
    assert len(batch) == 32 and all(torch.isfinite(m[0]).all() for m in batch)


def test_cli_rounds_interleave_and_take_the_median(tmp_path, monkeypatch):
    """--rounds N runs the whole case list N times, round after round, and reports each case's median round with
    every round's time."""
    order, fake = [], iter([3.0, 1.0, 2.0, 6.0, 4.0, 5.0])

    def child(case, timeout):
        order.append(case["provider"])
        return {**case, "time_s": next(fake), "round_marker": len(order)}

    monkeypatch.setattr(bench, "run_child", child)
    cases = [dict(problem="tiny", provider=p, mode="train") for p in ("reference", "torch")]
    recs = bench.run_rounds(cases, 3, timeout=10)
    assert order == ["reference", "torch"] * 3  # interleaved, not three of one then three of the other
    assert [r["rounds_time_s"] for r in recs] == [[3.0, 2.0, 4.0], [1.0, 6.0, 5.0]]
    assert [r["time_s"] for r in recs] == [3.0, 5.0]
    assert [r["round_marker"] for r in recs] == [1, 6]  # the fields of the median round itself


def test_records_of_a_cuda_run_without_cuda_name_the_reason():
    """Where CUDA is asked for but cannot be used, the results files are still written, their device saying why."""
    if torch.cuda.is_available():
        pytest.skip("CUDA works here")
    prov = bench.provenance("cuda")
    assert prov["device"]["type"] == "cuda" and prov["device"]["name"].startswith("CUDA unavailable: ")
    from ik_fast import records

    records.record("timing", "tiny", "torch", "step_time", None, "s", error="no CUDA", prov=prov)  # validates
