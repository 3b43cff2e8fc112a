"""Training on real QM9 molecules and on the charged-particle N-body task.

    python -m ik_fast.models.train qm9 --target homo [--quick] [--epochs E] [--steps S] [--edge-attrs none|bond|atom]
    ... python -m ik_fast.models.train nbody [--quick] ...
    ... [--nonlinearity fourier_elu|gated|norm]      # the implicit kernels' hidden nonlinearity (both tasks)
    torchrun --nproc_per_node 2 -m ik_fast.models.train qm9 --quick      # DistributedDataParallel (gloo on CPU, NCCL
    on GPU)

QM9: fixed train/validation/test split by ``--seed`` (the research code's proportions; ``--n-train`` etc. take
subsets of the same split), targets standardised with the training mean and standard deviation, L1 loss, AdamW with
a cosine schedule (linear warm-up), gradient clipping, a tqdm progress bar with loss and throughput, the validation
MAE after every epoch and the test MAE at the end, in the paper's units (meV for HOMO/LUMO/gap). The baseline is the
MAE of predicting the training mean. Each run writes ``<out>/checkpoint.pt`` (state dicts + config + history, after
every epoch; ``--resume`` continues from it), ``<out>/history.json`` and ``<out>/learning_curve.png``.

One process trains on the GPU when there is one (``IK_FAST_TRAIN_DEVICE=cpu`` keeps it on the CPU; not measured:
no GPU was available to the session that wrote this). Under torchrun every process trains on its shard of each
epoch (``DistributedSampler``; ``--batch-size`` molecules per process), gradients are averaged by DDP, only rank 0
prints and writes files, and the validation/test errors are summed over all processes' shards. Batch norms under DDP:
see ``--sync-bn`` and the docs' training page, "Multi-process training".

``--nonlinearity`` is passed to every :class:`ik_fast.ImplicitPointConv` of the model (its kernel MLP's hidden
nonlinearity, :class:`ik_fast.ImplicitKernel`'s ``nonlinearity``): ``fourier_elu`` (default, the paper's; approximately
equivariant on continuous groups), ``gated`` or ``norm`` (exactly equivariant). The run's configuration, history and
record name it; a record's problem is ``<task>[+<nonlinearity>]`` (``qm9-homo-quick+gated``; none for the default), as
the benchmark problems name theirs (``M+gated``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*py3nj.*")
warnings.filterwarnings("ignore", module="escnn.group.groups.so3group")

QM9_QUICK = dict(
    gspace="o3",
    num_layers=1,
    num_features=8,
    num_inv_features=32,
    L=1,
    kernel_layers=2,
    kernel_channels=8,
    cutoff=1.6,
    batch_size=16,
    epochs=2,
    n_train=1024,
    n_val=256,
    n_test=512,
    lr=3e-3,
    edge_attrs="bond",
    threads=1,
)
QM9_DEFAULT = dict(
    gspace="o3",
    num_layers=4,
    num_features=8,
    num_inv_features=32,
    L=1,
    kernel_layers=3,
    kernel_channels=8,
    cutoff=2.0,
    batch_size=32,
    epochs=100,
    n_train=None,
    n_val=None,
    n_test=None,
    lr=1e-3,
    edge_attrs="bond",
    threads=None,
)
NBODY_QUICK = dict(
    gspace="o3",
    num_layers=2,
    num_features=4,
    L=1,
    kernel_layers=2,
    kernel_channels=4,
    batch_size=20,
    epochs=8,
    n_train=600,
    n_val=200,
    n_test=200,
    lr=5e-3,
    threads=1,
)
NBODY_DEFAULT = dict(
    gspace="o3",
    num_layers=3,
    num_features=8,
    L=1,
    kernel_layers=3,
    kernel_channels=8,
    batch_size=100,
    epochs=100,
    n_train=3000,
    n_val=2000,
    n_test=2000,
    lr=5e-4,
    threads=None,
)
# the kernel MLP's hidden nonlinearities (ik_fast.spec.kernel.NONLINEARITIES, restated so that --help imports no escnn)
NONLINEARITIES = ("fourier_elu", "gated", "norm")
DEFAULT_NONLINEARITY = "fourier_elu"


# ----------------------------------------------------------------------------------------------------------------
# distributed helpers
class Dist:
    """The process group if launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = torch.device("cpu")
        if self.enabled:
            import torch.distributed as dist

            if torch.cuda.is_available():
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
                dist.init_process_group("nccl")
            else:
                dist.init_process_group("gloo")
        elif torch.cuda.is_available() and os.environ.get("IK_FAST_TRAIN_DEVICE", "cuda") == "cuda":
            self.device = torch.device("cuda")  # IK_FAST_TRAIN_DEVICE=cpu keeps a single process on the CPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: List[float]) -> List[float]:
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def _replica_report(model: torch.nn.Module, d: Dist) -> str:
    """Largest difference between this process's and rank 0's parameters, and buffers (running statistics)."""
    import torch.distributed as dist

    out = []
    for name, tensors in (
        ("parameters", [p for p in model.parameters()]),
        ("batch-norm running statistics", [b for n, b in model.named_buffers() if "running" in n]),
    ):
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        diff = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        out.append(f"{name} {float(diff):.3g}")
    return f"max difference across {d.world} processes: " + ", ".join(out)


def _log(d: Dist, *a) -> None:
    if d.main:
        print(*a, flush=True)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _problem(task: str, nonlinearity: str) -> str:
    """A training record's problem: the task, with ``+<nonlinearity>`` unless it is the default (``M+gated``'s
    convention in :func:`ik_fast.tools.problems.get_problem`)."""
    return task if nonlinearity == DEFAULT_NONLINEARITY else f"{task}+{nonlinearity}"


def _resolved(args, d: "Dist", edges: int) -> str:
    """The backend that ``--backend`` (``auto``: by device, edge count and nonlinearity) runs on a batch of
    ``edges`` edges."""
    from ik_fast.backends import resolve_backend

    return resolve_backend(args.backend, d.device, edges, activation=args.nonlinearity)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save_record(
    out: str, d: Dist, problem: str, backend: str, metric: str, value: float, unit: str, extra: Dict
) -> None:
    """``<out>/records.json``: the run's validation error as a measurement record (:mod:`ik_fast.records`, kind
    ``training``), ready for ``benchmarks/results/training/<device>/`` and ``benchmarks/report.py``."""
    from ik_fast import records

    precision = {"highest": "ieee", "high": "tf32", "medium": "bf16"}.get(torch.get_float32_matmul_precision(), "")
    rec = records.record(
        "training",
        problem,
        backend,
        metric,
        value,
        unit,
        mode="train",
        precision=precision,
        extra={**extra, "world": d.world},
        device=str(d.device),
    )
    records.write(os.path.join(out, "records.json"), [rec])


# the learning curve's y axis is logarithmic when its values span more than this ratio (N-body: the first steps' MSE
# is ~100x the final one, and a linear axis squashed validation and both baselines into one line at the bottom)
LOG_SCALE_RATIO = 10.0


def learning_curve_figure(
    history: Dict,
    title: str,
    unit: str,
    baseline: Optional[float],
    extra: Optional[Dict[str, float]] = None,
    baseline_label: str = "baseline",
):
    """The learning curve's matplotlib figure: the training metric (running mean), the validation metric after each
    epoch and the baselines as horizontal lines. When the plotted values are positive and span more than
    :data:`LOG_SCALE_RATIO`, the axis is logarithmic and a second panel shows the validation curve against the
    baselines on a linear axis of their own range, where they would otherwise overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ([(baseline_label, baseline, dict(color="k", ls="--"))] if baseline is not None else []) + [
        (name, val, dict(color="gray", ls=":")) for name, val in (extra or {}).items()
    ]
    train = None
    if history["train_step"]:
        s = np.asarray(history["train_step"])
        v = np.asarray(history["train_metric"], dtype=float)
        k = max(1, len(v) // 30)
        train = (s[k - 1 :], np.convolve(v, np.ones(k) / k, mode="valid"), k)
    val_step, val = list(history["val_step"]), np.asarray(history["val_metric"], dtype=float)
    values = np.concatenate([train[1] if train else np.zeros(0), val, [x for _, x, _ in lines]])
    values = values[np.isfinite(values)]
    log = values.size > 0 and bool((values > 0).all()) and values.max() > LOG_SCALE_RATIO * values.min()
    fig, axes = plt.subplots(1, 2 if log else 1, figsize=(11, 4) if log else (6, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(train[0], train[1], label=f"train (running mean of {train[2]} steps)", alpha=0.7)
    ax.plot(val_step, val, "o-", label="validation")
    for name, y, style in lines:
        ax.axhline(y, label=name, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(unit + (" (log scale)" if log else ""))
    if log:
        ax.set_yscale("log")
        ax.set_title("all steps")
        zoom = axes[0, 1]
        zoom.plot(val_step, val, "o-", color="C1", label="validation")
        for name, y, style in lines:
            zoom.axhline(y, label=name, **style)
        band = np.concatenate([val, [y for _, y, _ in lines]])
        band = band[np.isfinite(band)]
        if band.size:
            lo, hi = band.min(), band.max()
            pad = 0.1 * (hi - lo) if hi > lo else 0.1 * abs(hi) or 1.0
            zoom.set_ylim(lo - pad, hi + pad)
        zoom.set_xlabel("optimizer step")
        zoom.set_ylabel(unit)
        zoom.set_title("validation and baselines")
        zoom.legend()
        fig.suptitle(title)
    else:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def _save_plot(
    history: Dict,
    path: str,
    title: str,
    unit: str,
    baseline: Optional[float],
    extra: Optional[Dict[str, float]] = None,
    baseline_label: str = "baseline",
) -> None:
    import matplotlib.pyplot as plt

    fig = learning_curve_figure(history, title, unit, baseline, extra, baseline_label)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrap_ddp(model: torch.nn.Module, d: Dist, sync_bn: bool):
    if sync_bn:
        from ik_fast.nn.sync_bn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------------
def _apply_preset(args, quick: Dict, default: Dict) -> None:
    preset = quick if args.quick else default
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small preset that runs in a few minutes on 2 CPU cores")
    p.add_argument("--gspace", choices=["o3", "so3", "so2", "o2", "ico", "trivial"], default=None)
    p.add_argument("--num-layers", dest="num_layers", type=int, default=None)
    p.add_argument("--num-features", dest="num_features", type=int, default=None)
    p.add_argument("--L", type=int, default=None, help="band limit of the features")
    p.add_argument("--kernel-layers", dest="kernel_layers", type=int, default=None)
    p.add_argument("--kernel-channels", dest="kernel_channels", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps in all")
    p.add_argument("--n-train", dest="n_train", type=int, default=None)
    p.add_argument("--n-val", dest="n_val", type=int, default=None)
    p.add_argument("--n-test", dest="n_test", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=10.0, help="gradient-norm clipping threshold")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps before the cosine decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the order")
    p.add_argument("--backend", default="auto", help="ik_fast backend: auto, torch, reference")
    p.add_argument(
        "--nonlinearity",
        choices=NONLINEARITIES,
        default=DEFAULT_NONLINEARITY,
        help="hidden nonlinearity of every implicit kernel's MLP: fourier_elu (the paper's; approximately "
        "equivariant on continuous groups), gated or norm (exactly equivariant)",
    )
    p.add_argument("--out", default=None, help="output folder (default build/runs/<task>, git-ignored)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument(
        "--sync-bn",
        dest="sync_bn",
        action="store_true",
        help="synchronise the batch statistics of the model's batch norms across processes",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (--quick: 1; measured: with 2 threads on a loaded 2-core "
        "machine OpenMP spins and a quick run used 10x the CPU time)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")


def _check_args(args) -> None:
    for name in ("num_layers", "num_features", "L", "kernel_layers", "kernel_channels", "batch_size", "epochs"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("num_layers", "L") else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {v}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps must be positive, got {args.steps}")


def _optim(model, args, total_steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, total_steps, min(args.warmup, total_steps)))
    return opt, sched


def _setup_training(model, args, d: Dist, n_train: int, what: str, out: str):
    """DDP wrapping, the distributed sampler, the step budget, optimiser and schedule, and the state resumed from
    ``out``'s checkpoint with ``--resume``: what the QM9 and N-body trainers share."""
    from torch.utils.data import DistributedSampler

    ddp_model = _wrap_ddp(model, d, args.sync_bn)
    core = ddp_model.module if d.enabled else ddp_model
    sampler = DistributedSampler(
        range(n_train), num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch < 1:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} is larger than each process's share of the "
            f"training set ({len(sampler)} {what})"
        )
    total = steps_per_epoch * args.epochs if args.steps is None else min(args.steps, steps_per_epoch * args.epochs)
    epochs = math.ceil(total / steps_per_epoch)
    opt, sched = _optim(ddp_model, args, total)
    ckpt = os.path.join(out, "checkpoint.pt")
    history = dict(train_step=[], train_metric=[], val_step=[], val_metric=[], epoch_time=[])
    step, start_epoch = 0, 0
    if args.resume:
        if not os.path.exists(ckpt):
            raise SystemExit(f"error: --resume given but {ckpt} does not exist")
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        saved = ck.get("config", {}).get("nonlinearity", DEFAULT_NONLINEARITY)
        if saved != args.nonlinearity:
            raise SystemExit(
                f"error: {ckpt} was trained with --nonlinearity {saved}, not {args.nonlinearity}: pass "
                f"--nonlinearity {saved} to resume it"
            )
        ck = _load_checkpoint(ckpt, ddp_model, opt, sched, d)
        step, start_epoch, history = ck["step"], ck["epoch"], ck["history"]
    return ddp_model, core, sampler, steps_per_epoch, total, epochs, opt, sched, ckpt, history, step, start_epoch


def _load_checkpoint(path: str, model, opt, sched, d: Dist):
    ck = torch.load(path, map_location=d.device, weights_only=False)
    (model.module if hasattr(model, "module") else model).load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    return ck


def _save_checkpoint(
    path: str, model, opt, sched, config: Dict, epoch: int, step: int, history: Dict, extra: Dict
) -> None:
    m = model.module if hasattr(model, "module") else model
    tmp = path + ".tmp"
    torch.save(
        dict(
            model=m.state_dict(),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            config=config,
            epoch=epoch,
            step=step,
            history=history,
            **extra,
        ),
        tmp,
    )
    os.replace(tmp, path)


def _run_task(p: argparse.ArgumentParser, argv: List[str], quick: Dict, default: Dict, run) -> int:
    """Parse a task's arguments (its own plus the common ones), then run it in this process's distributed context."""
    _common_args(p)
    args = p.parse_args(argv)
    _apply_preset(args, quick, default)
    _check_args(args)
    d = Dist()
    try:
        return run(args, d)
    finally:
        d.close()


def _epoch_start(ddp_model, sampler, epoch: int, epochs: int, steps_per_epoch: int, steps_left: int, d: Dist, args):
    """A training epoch's sample order, its number of steps, its progress bar and its start time."""
    ddp_model.train()
    sampler.set_epoch(epoch)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    n_steps = min(steps_per_epoch, steps_left)
    return order, n_steps, _progress(n_steps, d.main and args.progress, f"epoch {epoch + 1}/{epochs}"), time.time()


def _optimizer_step(loss, ddp_model, opt, sched, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), clip)
    opt.step()
    sched.step()


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


# ----------------------------------------------------------------------------------------------------------------
def train_qm9(argv: List[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ik_fast.models.train qm9",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ik_fast.models.qm9 import EDGE_ATTRS, TARGETS

    p.add_argument("--target", default="homo", choices=sorted(TARGETS))
    p.add_argument("--edge-attrs", dest="edge_attrs", choices=EDGE_ATTRS, default=None)
    p.add_argument("--num-inv-features", dest="num_inv_features", type=int, default=None)
    p.add_argument("--cutoff", type=float, default=None, help="radius graph cutoff in Angstrom")
    p.add_argument("--limit", type=int, default=None, help="use only the first LIMIT molecules of QM9 (tests)")
    return _run_task(p, argv, QM9_QUICK, QM9_DEFAULT, _run_qm9)


def _run_qm9(args, d: Dist) -> int:

    from ik_fast.models import QM9Model, build_gspace
    from ik_fast.models.qm9 import TARGETS, collate, edge_attr_size, load_qm9, qm9_splits

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("build", "runs", f"qm9_{args.target}")
    if d.main:
        os.makedirs(out, exist_ok=True)
    t_start = time.time()
    if d.enabled and not d.main:
        d.barrier()  # rank 0 parses QM9 and writes the cache first
    data = load_qm9(args.limit)
    if d.enabled and d.main:
        d.barrier()
    splits = qm9_splits(len(data), args.seed, args.n_train, args.n_val, args.n_test)
    unit = TARGETS[args.target][2]
    y = data.targets[args.target]
    mean, std = float(y[splits["train"]].mean()), float(y[splits["train"]].std())
    baseline = float(np.abs(y[splits["val"]] - mean).mean())
    baseline_test = float(np.abs(y[splits["test"]] - mean).mean())
    _log(
        d,
        f"QM9 {args.target} ({unit}): {len(data)} molecules; train {len(splits['train'])}, val "
        f"{len(splits['val'])}, test {len(splits['test'])} (seed {args.seed}); training mean {mean:.1f}, std "
        f"{std:.1f}; baseline (training mean) val MAE {baseline:.1f} {unit}",
    )

    torch.manual_seed(args.seed)
    A = edge_attr_size(args.edge_attrs)
    model = QM9Model(
        build_gspace(args.gspace),
        num_layers=args.num_layers,
        num_features=args.num_features,
        num_inv_features=args.num_inv_features,
        L=args.L,
        edge_attr_size=A,
        kernel_n_layers=args.kernel_layers,
        kernel_n_channels=args.kernel_channels,
        backend=args.backend,
        nonlinearity=args.nonlinearity,
    ).to(d.device)
    n_params = sum(p.numel() for p in model.parameters())
    _log(
        d,
        f"model: {args.gspace} gspace, {args.num_layers} residual blocks, {args.num_features} fields L<={args.L}, "
        f"kernel MLP {args.kernel_layers} x {args.kernel_channels} ({args.nonlinearity}), edge attributes "
        f"{args.edge_attrs} ({A}), cutoff {args.cutoff} A, {n_params} parameters, backend {args.backend}, "
        f"{d.world} process(es), {torch.get_num_threads()} thread(s) each",
    )
    config = {k: v for k, v in vars(args).items()}
    config.update(task="qm9", target_mean=mean, target_std=std)
    (ddp_model, core, sampler, steps_per_epoch, total, epochs, opt, sched, ckpt, history, step, start_epoch) = (
        _setup_training(model, args, d, len(splits["train"]), "molecules", out)
    )
    if args.resume:
        _log(d, f"resumed from {ckpt}: epoch {start_epoch}, step {step}")
    ck_kw = dict(cutoff=args.cutoff, edge_attrs=args.edge_attrs)

    def evaluate(indices) -> float:
        core.eval()
        part = indices[d.rank :: d.world]
        err, n = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(part), 128):
                b = collate(data, part[s : s + 128], args.target, **ck_kw).to(d.device)
                pred = core(b.x, b.pos, b.edge_index, b.edge_attr, b.batch, b.n_graphs) * std + mean
                err += float((pred - b.y).abs().sum())
                n += b.n_graphs
        err, n = d.all_sum([err, n])
        return err / n

    val_mae = history["val_metric"][-1] if history["val_metric"] else float("nan")
    train_idx = splits["train"]
    backend_train = None  # what --backend runs on the first training batch
    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        order, n_steps, bar, t0 = _epoch_start(
            ddp_model, sampler, epoch, epochs, steps_per_epoch, total - step, d, args
        )
        mols = 0
        for k in range(n_steps):
            b = collate(
                data, train_idx[order[k * args.batch_size : (k + 1) * args.batch_size]], args.target, **ck_kw
            ).to(d.device)
            if backend_train is None:
                backend_train = f"{_resolved(args, d, b.edge_index.shape[1])} ({b.edge_index.shape[1]} edges)"
            pred = ddp_model(b.x, b.pos, b.edge_index, b.edge_attr, b.batch, b.n_graphs)
            loss = (pred - (b.y - mean) / std).abs().mean()
            _optimizer_step(loss, ddp_model, opt, sched, args.clip)
            step += 1
            mols += b.n_graphs * d.world
            mae = loss.item() * std
            history["train_step"].append(step)
            history["train_metric"].append(mae)
            bar.set_postfix_str(f"loss {loss.item():.3f} MAE {mae:.0f} {unit} {mols / (time.time() - t0):.1f} mol/s")
            bar.update(1)
        bar.close()
        val_mae = evaluate(splits["val"])
        history["val_step"].append(step)
        history["val_metric"].append(val_mae)
        history["epoch_time"].append(time.time() - t0)
        _log(
            d,
            f"epoch {epoch + 1}: step {step}, train MAE (last 10 steps) "
            f"{np.mean(history['train_metric'][-10:]):.1f} {unit}, val MAE {val_mae:.1f} {unit} "
            f"({val_mae / baseline:.3f} of baseline), {time.time() - t0:.1f} s",
        )
        if d.main:
            _save_checkpoint(ckpt, ddp_model, opt, sched, config, epoch + 1, step, history, dict(baseline=baseline))
            _save_plot(
                history,
                os.path.join(out, "learning_curve.png"),
                f"QM9 {args.target}: {args.gspace}, edge attributes {args.edge_attrs}",
                f"MAE ({unit})",
                baseline,
            )
    if d.enabled:
        _log(d, _replica_report(core, d))
    test_mae = evaluate(splits["test"])
    wall = time.time() - t_start
    if d.main:
        res = dict(
            val_mae=val_mae,
            test_mae=test_mae,
            baseline_val=baseline,
            baseline_test=baseline_test,
            steps=step,
            wall_s=wall,
            peak_rss_mb=_peak_rss_mb(),
            world=d.world,
            history=history,
            config=config,
        )
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(res, f, indent=1)
        _save_record(
            out,
            d,
            _problem(f"qm9-{args.target}" + ("-quick" if args.quick else ""), args.nonlinearity),
            args.backend,
            "val_mae",
            val_mae,
            unit,
            dict(
                baseline=baseline,
                test_mae=test_mae,
                test_baseline=baseline_test,
                baseline_is="the training mean",
                seed=args.seed,
                nonlinearity=args.nonlinearity,
                backend_first_batch=backend_train,
                steps=step,
                wall_s=round(wall, 1),
                peak_rss_mb=round(_peak_rss_mb()),
                config=config,
            ),
        )
    _log(
        d,
        f"test MAE {test_mae:.1f} {unit} (baseline {baseline_test:.1f}); {step} steps, {wall:.0f} s wall, "
        f"peak RSS {_peak_rss_mb():.0f} MB (rank 0); outputs in {out}/",
    )
    _log(
        d,
        f"val_mae_meV={val_mae:.1f} baseline_meV={baseline:.1f}"
        if unit == "meV"
        else f"val_mae={val_mae:.4g} baseline={baseline:.4g}",
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------
def train_nbody(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ik_fast.models.train nbody")
    p.add_argument("--horizon", type=int, default=1000, help="simulation steps between input and target")
    return _run_task(p, argv, NBODY_QUICK, NBODY_DEFAULT, _run_nbody)


def _run_nbody(args, d: Dist) -> int:

    from ik_fast.models import NBodyModel, build_gspace
    from ik_fast.models.nbody import nbody_dataset, nbody_graph

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("build", "runs", "nbody")
    if d.main:
        os.makedirs(out, exist_ok=True)
    t_start = time.time()
    sets = {
        k: nbody_dataset(n, horizon=args.horizon, seed=args.seed * 3 + i)
        for i, (k, n) in enumerate((("train", args.n_train), ("val", args.n_val), ("test", args.n_test)))
    }

    def baselines(s):
        const = float(((s["target"] - s["pos"]) ** 2).mean())
        lin = float(((s["target"] - s["pos"] - s["vel"] * s["dt"]) ** 2).mean())
        return const, lin

    b_const, b_lin = baselines(sets["val"])
    span = float(sets["val"]["dt"])
    _log(
        d,
        f"N-body: 5 charged particles, predict positions after {args.horizon} steps ({span:.2f} "
        f"time units); train {args.n_train}, val {args.n_val}, test {args.n_test} systems; val baselines: constant "
        f"position MSE {b_const:.4f}, position + velocity x time MSE {b_lin:.4f}",
    )
    torch.manual_seed(args.seed)
    model = NBodyModel(
        build_gspace(args.gspace),
        num_layers=args.num_layers,
        num_features=args.num_features,
        L=args.L,
        kernel_n_layers=args.kernel_layers,
        kernel_n_channels=args.kernel_channels,
        backend=args.backend,
        nonlinearity=args.nonlinearity,
    ).to(d.device)
    _log(
        d,
        f"model: {args.gspace}, {args.num_layers} layers of {args.num_features} fields L<={args.L}, kernel MLP "
        f"{args.kernel_layers} x {args.kernel_channels} ({args.nonlinearity}), "
        f"{sum(p.numel() for p in model.parameters())} parameters, backend {args.backend}",
    )
    config = dict(vars(args), task="nbody")
    (ddp_model, core, sampler, steps_per_epoch, total, epochs, opt, sched, ckpt, history, step, start_epoch) = (
        _setup_training(model, args, d, args.n_train, "systems", out)
    )

    edges_per_batch = int(nbody_graph(args.batch_size).shape[1])
    backend_train = f"{_resolved(args, d, edges_per_batch)} ({edges_per_batch} edges)"  # on every training batch

    def batch(s, idx):
        g = nbody_graph(len(idx))
        return (
            s["pos"][idx].reshape(-1, 3),
            s["vel"][idx].reshape(-1, 3),
            s["charge"][idx].reshape(-1),
            s["target"][idx].reshape(-1, 3),
            g,
        )

    def evaluate(s) -> float:
        core.eval()
        idx = np.arange(len(s["pos"]))[d.rank :: d.world]
        err, n = 0.0, 0
        with torch.no_grad():
            for k in range(0, len(idx), 100):
                pos, vel, q, tgt, g = batch(s, idx[k : k + 100])
                err += float(((core(pos, vel, q, g) - tgt) ** 2).sum())
                n += tgt.numel()
        err, n = d.all_sum([err, n])
        return err / n

    val_mse = float("nan")
    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        order, n_steps, bar, t0 = _epoch_start(
            ddp_model, sampler, epoch, epochs, steps_per_epoch, total - step, d, args
        )
        for k in range(n_steps):
            pos, vel, q, tgt, g = batch(sets["train"], order[k * args.batch_size : (k + 1) * args.batch_size])
            loss = ((ddp_model(pos, vel, q, g) - tgt) ** 2).mean()
            _optimizer_step(loss, ddp_model, opt, sched, args.clip)
            step += 1
            history["train_step"].append(step)
            history["train_metric"].append(loss.item())
            bar.set_postfix_str(
                f"MSE {loss.item():.4f} {(k + 1) * args.batch_size * d.world / (time.time() - t0):.1f} systems/s"
            )
            bar.update(1)
        bar.close()
        val_mse = evaluate(sets["val"])
        history["val_step"].append(step)
        history["val_metric"].append(val_mse)
        history["epoch_time"].append(time.time() - t0)
        _log(
            d,
            f"epoch {epoch + 1}: step {step}, val MSE {val_mse:.4f} ({val_mse / b_const:.3f} of the constant "
            f"baseline), {time.time() - t0:.1f} s",
        )
        if d.main:
            _save_checkpoint(ckpt, ddp_model, opt, sched, config, epoch + 1, step, history, {})
            _save_plot(
                history,
                os.path.join(out, "learning_curve.png"),
                "N-body: position after the horizon",
                "MSE",
                b_const,
                {"position + velocity x time": b_lin},
                baseline_label="baseline (constant position)",
            )
    if d.enabled:
        _log(d, _replica_report(core, d))
    test_mse = evaluate(sets["test"])
    wall = time.time() - t_start
    if d.main:
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(
                dict(
                    val_mse=val_mse,
                    test_mse=test_mse,
                    baseline_const=b_const,
                    baseline_linear=b_lin,
                    steps=step,
                    wall_s=wall,
                    peak_rss_mb=_peak_rss_mb(),
                    history=history,
                    config=config,
                ),
                f,
                indent=1,
            )
        _save_record(
            out,
            d,
            _problem("nbody" + ("-quick" if args.quick else ""), args.nonlinearity),
            args.backend,
            "val_mse",
            val_mse,
            "1",
            dict(
                baseline=b_const,
                test_mse=test_mse,
                baseline_is="the constant-position prediction",
                baseline_linear=b_lin,
                seed=args.seed,
                nonlinearity=args.nonlinearity,
                backend_first_batch=backend_train,
                steps=step,
                wall_s=round(wall, 1),
                peak_rss_mb=round(_peak_rss_mb()),
                config=config,
            ),
        )
    _log(
        d,
        f"test MSE {test_mse:.4f}; position + velocity x time baseline (val) {b_lin:.4f}; {step} steps, "
        f"{wall:.0f} s wall, peak RSS {_peak_rss_mb():.0f} MB (rank 0)",
    )
    _log(d, f"val_mse={val_mse:.4f} baseline_mse={b_const:.4f}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tasks = {"qm9": train_qm9, "nbody": train_nbody}
    if not argv or argv[0] not in tasks:
        print(
            "usage: python -m ik_fast.models.train {qm9|nbody} [options]   (--help after the task for options)",
            file=sys.stderr,
        )
        return 2
    return tasks[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
