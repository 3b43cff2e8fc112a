"""python -m ik_fast.models.train end to end on tiny budgets: outputs, checkpoints and --resume, N-body, two gloo
processes (DDP keeps the replicas identical), synchronised batch norms equal to one process's on the union of the
batches."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ik_fast.testing import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--num-layers",
    "0",
    "--num-features",
    "2",
    "--num-inv-features",
    "4",
    "--kernel-layers",
    "2",
    "--kernel-channels",
    "2",
    "--backend",
    "reference",
    "--no-progress",
    "--threads",
    "1",
]
needs_qm9 = pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason="QM9 needs qm9pack")


def _env(tmp_path):
    env = dict(
        os.environ,
        IK_FAST_CACHE=str(tmp_path / "cache"),
        PYTHONWARNINGS="ignore::UserWarning:escnn.group.groups.so3group",
    )
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def in_process(tmp_path, monkeypatch, capsys):
    """Run ``python -m ik_fast.models.train ...`` in this process (no interpreter start-up); returns its stdout."""
    from ik_fast.models.train import main

    monkeypatch.setenv("IK_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()

    def run(args):
        capsys.readouterr()
        try:
            rc = main(args)
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr().out
        assert rc == 0, out
        return out

    return run


def _run(cmd, tmp_path, timeout=300):
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@needs_qm9
def test_qm9_train_and_resume(tmp_path, in_process):
    out = tmp_path / "run"
    args = [
        "qm9",
        "--limit",
        "150",
        "--n-train",
        "32",
        "--n-val",
        "12",
        "--n-test",
        "12",
        "--batch-size",
        "8",
        "--out",
        str(out),
        *TINY,
    ]
    log = in_process(args + ["--epochs", "1"])
    last = log.strip().splitlines()[-1]
    m = re.fullmatch(r"val_mae_meV=([0-9.]+) baseline_meV=([0-9.]+)", last)
    assert m, last
    assert float(m.group(2)) > 0
    assert (out / "checkpoint.pt").exists() and (out / "learning_curve.png").stat().st_size > 1000
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 4 and ck["epoch"] == 1 and ck["config"]["target"] == "homo"
    res = json.loads((out / "history.json").read_text())
    assert res["val_mae"] == pytest.approx(float(m.group(1)), abs=0.06)
    log2 = in_process(args + ["--epochs", "2", "--resume"])
    assert "resumed from" in log2 and "epoch 2: step 8" in log2 and "epoch 1:" not in log2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 8


def test_train_errors(capsys):
    from ik_fast.models.train import main

    with pytest.raises(SystemExit, match="--batch-size must be positive"):
        main(["qm9", "--batch-size", "0"])
    assert main(["qm10"]) == 2 and "qm9|nbody" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["qm9", "--edge-attrs", "bonds"])
    assert "invalid choice" in capsys.readouterr().err


def test_nbody_train(tmp_path, in_process):
    log = in_process(
        [
            "nbody",
            "--n-train",
            "20",
            "--n-val",
            "10",
            "--n-test",
            "10",
            "--batch-size",
            "10",
            "--epochs",
            "1",
            "--horizon",
            "100",
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
            str(tmp_path / "nb"),
        ]
    )
    m = re.fullmatch(r"val_mse=([0-9.]+) baseline_mse=([0-9.]+)", log.strip().splitlines()[-1])
    assert m and float(m.group(2)) > 0


def test_nonlinearity_reaches_the_kernels_and_the_record(tmp_path, in_process):
    """--nonlinearity: every implicit convolution of the model is built with it (the checkpoint holds the norm
    nonlinearity's biases of each kernel), and the configuration and the record name it."""
    from ik_fast.models import train
    from ik_fast.spec.kernel import NONLINEARITIES

    assert train.NONLINEARITIES == NONLINEARITIES and train.DEFAULT_NONLINEARITY == NONLINEARITIES[0]
    out = tmp_path / "nb"
    args = ["nbody", "--n-train", "10", "--n-val", "5", "--n-test", "5", "--batch-size", "5", "--epochs", "1"]
    args += ["--horizon", "20", "--num-layers", "1", "--num-features", "2", "--kernel-layers", "2"]
    args += ["--kernel-channels", "2", "--backend", "reference", "--no-progress", "--out", str(out)]
    log = in_process(args + ["--nonlinearity", "norm"])
    assert "kernel MLP 2 x 2 (norm)" in log
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["config"]["nonlinearity"] == "norm"
    kernels = {k.split(".kernel.")[0] for k in ck["model"] if ".kernel." in k}
    assert kernels == {"convs.0", "readout"}
    assert all(f"{k}.kernel.act_bias.0" in ck["model"] for k in kernels)
    (rec,) = json.loads((out / "records.json").read_text())["records"]
    assert rec["problem"] == "nbody+norm" and rec["extra"]["nonlinearity"] == "norm"
    assert rec["extra"]["config"]["nonlinearity"] == "norm"
    assert rec["extra"]["backend_first_batch"] == "reference (125 edges)"
    # a checkpoint resumes only with its own nonlinearity
    with pytest.raises(SystemExit, match="--nonlinearity norm"):
        in_process(args + ["--nonlinearity", "gated", "--resume", "--epochs", "2"])
    # the default is the paper's, and its record's problem is the task's plain name
    in_process(args + ["--out", str(tmp_path / "default")])
    (rec,) = json.loads((tmp_path / "default" / "records.json").read_text())["records"]
    assert rec["problem"] == "nbody" and rec["extra"]["nonlinearity"] == "fourier_elu"


@needs_qm9
def test_torchrun_two_gloo_processes(tmp_path):
    """Two processes with gloo, a few steps on different shards: DDP keeps the parameters identical."""
    log = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "ik_fast.models.train",
            "qm9",
            "--limit",
            "150",
            "--n-train",
            "32",
            "--n-val",
            "12",
            "--n-test",
            "12",
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--sync-bn",
            "--out",
            str(tmp_path / "ddp"),
            *TINY,
        ],
        tmp_path,
    )
    m = re.search(
        r"max difference across 2 processes: parameters ([0-9.e+-]+), batch-norm running statistics "
        r"([0-9.e+-]+)",
        log,
    )
    assert m, log
    assert float(m.group(1)) == 0.0
    assert "2 process(es)" in log and re.search(r"val_mae_meV=[0-9.]+ baseline_meV=[0-9.]+\s*$", log)


def _sync_bn_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    from escnn import gspaces
    from escnn import nn as enn

    from ik_fast.nn.sync_bn import SyncBatchNorm1d, SyncIIDBatchNorm1d

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(10, 3) * 2 + 1  # the union batch; rank r holds rows r::2 (5 rows each)
    gs = gspaces.no_base_space(gspaces.flipRot3dOnR3().fibergroup)
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.bl_sphere_representation(L=1)] * 2)
    f = torch.randn(10, ft.size) + 0.5
    bn = SyncBatchNorm1d(3)
    iid = SyncIIDBatchNorm1d(ft)
    xl = x[rank::world].clone().requires_grad_(True)
    y = bn(xl)
    (y**3).sum().backward()
    fy = iid(enn.GeometricTensor(f[rank::world], ft)).tensor
    # an implicit layer whose kernel MLP normalises over the union of both processes' edges
    import ik_fast
    from ik_fast.nn.sync_bn import convert_sync_batchnorm

    gs3 = gspaces.flipRot3dOnR3()
    ft3 = enn.FieldType(gs3, [gs3.fibergroup.bl_sphere_representation(L=1)])
    torch.manual_seed(1)
    conv = ik_fast.ImplicitPointConv(ft3, ft3, n_layers=3, n_channels=2, backend="torch")
    ref_conv = ik_fast.ImplicitPointConv(ft3, ft3, n_layers=3, n_channels=2, backend="torch")
    ref_conv.load_state_dict(conv.state_dict())
    convert_sync_batchnorm(conv)
    pos, xs = torch.randn(12, 3), torch.randn(12, ft3.size)
    ei = torch.randint(0, 12, (2, 60))
    conv(xs, ei[:, rank::world], pos=pos)  # each process: half of the edges
    ref_conv(xs, ei, pos=pos)  # one process: all of them
    # the same on one process with the whole batch
    ref_bn = torch.nn.BatchNorm1d(3)
    xr = x.clone().requires_grad_(True)
    yr = ref_bn(xr)
    (yr**3).sum().backward()
    ref_iid = enn.IIDBatchNorm1d(ft)
    fr = ref_iid(enn.GeometricTensor(f, ft)).tensor
    errs = dict(
        bn=float((y - yr[rank::world]).abs().max()),
        grad=float((xl.grad - xr.grad[rank::world]).abs().max()),
        running_var=float((bn.running_var - ref_bn.running_var).abs().max()),
        iid=float((fy - fr[rank::world]).abs().max()),
        iid_running=max(
            float((a - b).abs().max()) for a, b in zip(iid.buffers(), ref_iid.buffers()) if a.dtype.is_floating_point
        ),
        kernel_running=max(
            float((a - b).abs().max())
            for (n, a), b in zip(conv.kernel.bn.named_buffers(), ref_conv.kernel.bn.buffers())
            if n.endswith(("running_mean", "running_var"))
        ),
    )
    torch.save(errs, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_sync_batchnorm_matches_union_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_bn_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    for r in range(2):
        errs = torch.load(f"{tmp_path / 'res'}.{r}")
        # the statistics of both processes' edges summed in another order than on one process (values of order 1)
        assert all(v <= tolerance("reorder", torch.float32) for v in errs.values()), (r, errs)
