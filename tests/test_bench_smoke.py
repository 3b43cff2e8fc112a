"""A tiny smoke run of the benchmark harness (the full suite is not part of the tests)."""

import json

import pytest
import torch

from ik_fast import bench
from ik_fast.problems import PROBLEMS, get_problem


@pytest.mark.parametrize("provider", ["escnn", "reference", "torch", "triton"])
@pytest.mark.parametrize("mode", bench.MODES)
def test_measure_tiny(mode, provider):
    if provider == "triton" and "triton" not in bench._available():
        pytest.skip("Triton not available")
    rec = bench.measure("tiny", provider, mode, repeats=1, warmup=0, min_time_s=0)
    assert rec["time_s"] > 0 and rec["flops"] > 0 and rec["edges"] == 64 * 8
    assert rec["peak_rss_mb"] > 0 and rec["warmup_s"] > 0


def test_suites_share_the_problem_list():
    from ik_fast.problems import get_problem

    for suite in bench.suites().values():
        for name in suite["problems"]:
            get_problem(name)  # every suite problem comes from the one list


def test_skewed_graph_has_a_hub():
    from ik_fast.data import skewed_graph

    pos, ei = skewed_graph(3000, 8, hub_degree=2000)
    deg = ei[1].bincount(minlength=3000)
    assert deg.max() == 2000 and deg.min() >= 1 and ei[0].max() < 3000


def test_cli_child_process(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--problems", "tiny", "--providers", "reference,torch", "--modes", "train", "--repeats", "1",
                       "--warmup", "0", "--min-time", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["provider"] for r in data["records"]} == {"reference", "torch"}
    assert all("error" not in r for r in data["records"]), data["records"]
    assert data["environment"]["device_name"].startswith("CPU")


def test_problem_list():
    assert {"cpu", "P", "M", "H"} <= set(PROBLEMS)
    assert get_problem("H").field_dim == 144 and get_problem("M").field_dim == 32
    assert get_problem("M@1024").nodes == 1024
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("Q")


def test_field_dims_match_the_field_types():
    from ik_fast.problems import field_types

    for name in ("cpu", "P", "planar", "tiny"):
        p = get_problem(name)
        assert field_types(p)[0].size == p.field_dim, name


def test_qm9_batch_is_real_data():
    from ik_fast.data import molecule_batch, qm9_molecules

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
