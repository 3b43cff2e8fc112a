"""Tables and plots from the measurement records in ``benchmarks/results/`` (schema: ``ik_fast/records.py``).

    python benchmarks/report.py                 # every section as Markdown on stdout
    python benchmarks/report.py timing          # one section (SECTIONS: summary, timing, spread, compile, ...)
    python benchmarks/report.py --plots DIR     # also write the timing plots (PNG) into DIR
    python benchmarks/report.py --readme        # README.md's block between the results markers := the summary
                                                # (timing, then the kernel nonlinearities' table)

The documentation's benchmark pages are made from these sections when the site is built (``docs/hooks.py``), so a
figure on a page always comes from a record, and every row names the commit that measured it. Timing tables take the
newest record of each (device, problem, provider, mode, precision, metric); records of a repeat series
(``extra.series``) are shown apart, as the spread of repeated runs.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
README = os.path.join(ROOT, "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"
SECTIONS = (
    "summary",
    "timing",
    "spread",
    "threads",
    "compile_timing",
    "compile",
    "precision",
    "work",
    "equivariance",
    "training",
    "nonlinearities",
    "gpu_model",
    "tests",
)


def _records_module():
    """ik_fast/records.py loaded by path: the report needs neither torch nor escnn."""
    spec = importlib.util.spec_from_file_location("_ik_fast_records", os.path.join(ROOT, "ik_fast", "records.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


records = _records_module()


def result_files(root: str = RESULTS) -> List[str]:
    """Every file under ``root`` (each must be a results file; the tests check that)."""
    return sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p))


def load_all(root: str = RESULTS) -> List[Dict]:
    """Every record under ``root``, each with ``_file`` (its path relative to the repository) added."""
    out = []
    for path in result_files(root):
        for r in records.load(path):
            out.append({**r, "_file": os.path.relpath(path, ROOT)})
    return out


def newest(
    recs: Iterable[Dict],
    key=("device", "problem", "provider", "mode", "precision", "metric"),
    extra_key: Tuple[str, ...] = (),
) -> List[Dict]:
    """The newest record (by date, then file name) per key (and the ``extra`` fields ``extra_key``); device compared
    by name."""
    best: Dict[Tuple, Dict] = {}
    for r in recs:
        k = tuple(r["device"]["name"] if f == "device" else r[f] for f in key)
        k += tuple(json.dumps(r["extra"].get(f)) for f in extra_key)
        if k not in best or (r["date"], r["_file"]) >= (best[k]["date"], best[k]["_file"]):
            best[k] = r
    return list(best.values())


def check_tree(root: str = RESULTS) -> List[str]:
    """What in ``root`` breaks the layout ``<kind>/<device slug>/<name>.json`` of results files whose records follow
    the schema and each name a commit (40 hex digits, and one in this repository's history when that is at hand)."""
    problems = []
    known = _known_commits()
    for path in result_files(root):
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        if len(parts) != 3 or not parts[2].endswith(".json"):
            problems.append(f"{rel}: not <kind>/<device slug>/<name>.json")
            continue
        try:
            recs = records.load(path)
        except (ValueError, json.JSONDecodeError) as e:
            problems.append(f"{rel}: {e}")
            continue
        if not recs:
            problems.append(f"{rel}: no records")
        for i, r in enumerate(recs):
            where = f"{rel}: records[{i}]"
            if r["kind"] != parts[0]:
                problems.append(f"{where}: kind {r['kind']!r} in the folder {parts[0]!r}")
            if records.device_slug(r) != parts[1]:
                problems.append(f"{where}: device {r['device']['name']!r} in the folder {parts[1]!r}")
            if r["commit"] == "unknown":
                problems.append(f"{where}: names no commit")
            elif known is not None and r["commit"] not in known:
                problems.append(f"{where}: commit {r['commit'][:12]} is not in this repository's history")
    return problems


def _known_commits() -> Optional[set]:
    """Every commit of this checkout's history, or None outside a full git checkout."""
    import subprocess

    try:
        shallow = subprocess.run(
            ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        if shallow.returncode != 0 or shallow.stdout.strip() != "false":
            return None
        out = subprocess.run(["git", "rev-list", "--all"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


# ----------------------------------------------------------------------------------------------------- formatting


def _g(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return ""
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _commit(r: Dict) -> str:
    return r["commit"][:7] + ("*" if r["dirty"] else "")


def _table(head: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _problem_order(problem: str) -> Tuple:
    """Fixed problems first (by name), then the sweeps by family and size."""
    m = re.match(r"([A-Za-z0-9-]+?)@(\d+)$", problem)
    return (1, m.group(1), int(m.group(2))) if m else (0, problem, 0)


def _stack(r: Dict) -> str:
    s = r["stack"]
    parts = [f"{k} {s[k]}" for k in ("torch", "triton", "escnn", "numpy", "cuda", "python") if s.get(k)]
    return ", ".join(parts)


def _provenance_note(recs: List[Dict]) -> str:
    """One line per distinct (commit, day, file) behind a table."""
    seen = {}
    for r in recs:
        seen.setdefault((r["commit"], r["dirty"], r["date"][:10], r["_file"]), r)
    lines = []
    for (commit, dirty, date, path), r in sorted(seen.items(), key=lambda kv: (kv[0][2], kv[0][3])):
        how = r["extra"].get("commit_recovered")
        lines.append(
            f"- `{commit[:7]}`{' (dirty)' if dirty else ''}, {date}, {r['device']['name']}; {_stack(r)}; "
            f"`{path}`" + (f" — commit recovered as {how}" if how else "")
        )
    return "\n".join(lines)


DIRTY = "A `*` after a commit: the working tree differed from it, or (older records) whether it did was not recorded."


# ----------------------------------------------------------------------------------------------------- timing


def _timing(recs: List[Dict]) -> Dict[str, List[Dict]]:
    """Newest step-time and peak-memory records per device (series excluded)."""
    by_dev = defaultdict(list)
    for r in newest(r for r in recs if r["kind"] == "timing" and "series" not in r["extra"]):
        by_dev[r["device"]["name"]].append(r)
    return dict(sorted(by_dev.items()))


def _cases(dev_recs: List[Dict]):
    """{(problem, mode, provider, precision): {metric: record}} of one device."""
    cases = defaultdict(dict)
    for r in dev_recs:
        cases[(r["problem"], r["mode"], r["provider"], r["precision"])][r["metric"]] = r
    return cases


def _edges(case: Dict) -> Optional[int]:
    for r in case.values():
        if r["extra"].get("edges") is not None:
            return r["extra"]["edges"]
    return None


def timing_section(recs: List[Dict], plot_dir: Optional[str] = None, plot_prefix: str = "") -> str:
    """Per device: the plots (when ``plot_dir``) and one row per (problem, mode, provider)."""
    out = []
    for dev, dev_recs in _timing(recs).items():
        cases = _cases(dev_recs)
        out.append(f"### {dev}\n")
        if plot_dir is not None:
            for path, _ in plots(dev, cases, plot_dir):
                out.append(f"![{os.path.basename(path)}]({plot_prefix}{os.path.basename(path)})\n")
        rows = []
        for (problem, mode, provider, prec), m in sorted(
            cases.items(), key=lambda kv: (_problem_order(kv[0][0]), kv[0][1] != "train", kv[0][1], kv[0][2], kv[0][3])
        ):
            t, mem = m.get("step_time"), m.get("peak_memory")
            if t is None:
                continue
            if t["value"] is None:
                time = f"failed: {t.get('error', '')}"
                split = ""
            else:
                sp = t["spread"] or {}
                time = _g(t["value"]) + (f" [{_g(sp['p20'])}–{_g(sp['p80'])}]" if "p20" in sp else "")
                ex = t["extra"]
                split = f"{_g(ex['forward_s'])} / {_g(ex['backward_s'])}" if "forward_s" in ex else ""
            edges = _edges(m)
            rows.append(
                [
                    problem,
                    f"{edges:,}" if edges else "",
                    mode,
                    provider,
                    prec,
                    time,
                    split,
                    _g(mem["value"]) if mem and mem["value"] is not None else "",
                    _commit(t),
                    t["date"][:10],
                ]
            )
        out.append(
            _table(
                [
                    "problem",
                    "edges",
                    "mode",
                    "provider",
                    "precision",
                    "time (s) median [p20–p80]",
                    "forward / backward (s)",
                    "peak memory (MB)",
                    "commit",
                    "date",
                ],
                rows,
            )
        )
        out.append("\nMeasured by:\n\n" + _provenance_note(dev_recs) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n" if out else "No timing records.\n"


def summary_section(recs: List[Dict]) -> str:
    """Training step per fixed problem and provider, each figure with the commit that measured it, and the speedup
    over ``reference`` where both figures come from one run (the same commit and day)."""
    out = []
    for dev, dev_recs in _timing(recs).items():
        cases = _cases(dev_recs)
        providers = sorted({p for (_, mode, p, _), m in cases.items() if mode == "train"})
        rows = []
        problems = sorted({k[0] for k in cases if "@" not in k[0]}, key=_problem_order)
        for problem in problems:
            times = {
                p: m["step_time"]
                for (pr, mode, p, _), m in cases.items()
                if pr == problem and mode == "train" and "step_time" in m
            }
            if not times:
                continue
            ref = times.get("reference")
            cells = []
            for p in providers:
                r = times.get(p)
                if r is None:
                    cells.append("")
                elif r["value"] is None:
                    cells.append(f"failed `{_commit(r)}`")
                else:
                    same_run = ref and ref["value"] and (_commit(ref), ref["date"][:10]) == (_commit(r), r["date"][:10])
                    ratio = f" ({ref['value'] / r['value']:.1f}×)" if same_run and p != "reference" else ""
                    cells.append(f"{_g(r['value'])}{ratio} `{_commit(r)}`")
            edges = _edges({p: r for p, r in times.items()})
            rows.append([f"`{problem}`", f"{edges:,}" if edges else ""] + cells)
        out.append(
            f"Training step (forward + backward, s), {dev}; each figure with the commit that measured it (`*`: the "
            "tree had uncommitted changes or did not record it), in brackets the speedup over `reference` measured "
            "in the same run:\n"
        )
        out.append(_table(["problem", "edges", *[f"`{p}`" for p in providers]], rows) + "\n")
    if not out:
        return "No timing records.\n"
    nl = nonlinearities_section(recs)
    if not nl.startswith("No "):
        out.append(nl)
    gm = gpu_model_section(recs, kernels=False)
    if not gm.startswith("No "):
        out.append("\n" + gm)
    return "\n".join(out)


def spread_section(recs: List[Dict]) -> str:
    """Repeat series: each run's step time per provider and the ratio of the first provider to the last."""
    series = defaultdict(list)
    for r in recs:
        if r["kind"] == "timing" and "run" in r["extra"] and r["metric"] == "step_time":
            series[(r["device"]["name"], r["problem"], r["mode"], r["extra"]["series"])].append(r)
    out = []
    for (dev, problem, mode, text), rs in sorted(series.items()):
        providers = sorted({r["provider"] for r in rs}, key=lambda p: (p != "reference", p))
        runs = sorted({r["extra"]["run"] for r in rs})
        rows = []
        for run in runs:
            t = {r["provider"]: r["value"] for r in rs if r["extra"]["run"] == run}
            ratio = [f"{t[providers[0]] / t[p]:.2f}×" for p in providers[1:] if t.get(p)]
            rows.append([run, *[_g(t.get(p)) for p in providers], *ratio])
        out.append(f"`{problem}`, {mode}, {dev}: {text}; commit `{_commit(rs[0])}`, {rs[0]['date']}.\n")
        out.append(
            _table(
                ["run", *[f"`{p}` (s)" for p in providers], *[f"`{providers[0]}` / `{p}`" for p in providers[1:]]], rows
            )
            + "\n"
        )
    return "\n".join(out) if out else "No repeat series.\n"


def threads_section(recs: List[Dict]) -> str:
    """Step time by thread count on a quiet and on a busy machine (series "threads on a shared machine")."""
    rs = [r for r in recs if r["kind"] == "timing" and r["extra"].get("series") == "threads on a shared machine"]
    if not rs:
        return "No thread-count records.\n"
    rows = []
    for (problem, provider), group in sorted(_group(rs, lambda r: (r["problem"], r["provider"])).items()):
        t = {(r["extra"]["condition"], r["extra"]["threads"]): r["value"] for r in group}
        rows.append(
            [
                f"`{problem}`",
                f"`{provider}`",
                *[_g(t.get(k)) for k in (("quiet", 1), ("quiet", 2), ("busy", 1), ("busy", 2))],
                _commit(group[0]),
            ]
        )
    out = [
        f"{rs[0]['extra'].get('what', '')}; training step (s), {rs[0]['device']['name']}:\n",
        _table(
            [
                "problem",
                "provider",
                "quiet, 1 thread",
                "quiet, 2 threads",
                "busy, 1 thread",
                "busy, 2 threads",
                "commit",
            ],
            rows,
        ),
    ]
    out.append("\nMeasured by:\n\n" + _provenance_note(rs) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n"


def compile_timing_section(recs: List[Dict]) -> str:
    """torch.compile: eager step, first compiled call, a second graph size, compiled step; and graph preparation."""
    rs = [
        r for r in recs if r["kind"] == "timing" and r["extra"].get("series") in ("torch.compile", "graph preparation")
    ]
    if not rs:
        return "No torch.compile records.\n"
    out = []
    comp = [r for r in rs if r["extra"]["series"] == "torch.compile"]
    rows = []
    for (problem, provider), group in sorted(_group(comp, lambda r: (r["problem"], r["provider"])).items()):
        m = {r["metric"]: r for r in group}
        eager, step = m.get("eager_step_time"), m.get("compiled_step_time")
        ratio = f" (eager ÷ compiled = {eager['value'] / step['value']:.2f})" if eager and step else ""
        rows.append(
            [
                f"`{problem}`",
                f"`{provider}`",
                f"{group[0]['extra'].get('edges', ''):,}",
                *[
                    _g(m[k]["value"]) if k in m else ""
                    for k in ("eager_step_time", "compile_first_call_time", "compile_second_graph_time")
                ],
                (_g(step["value"]) + ratio) if step else "",
                _commit(group[0]),
            ]
        )
    if rows:
        out.append(f"Training step (s), {comp[0]['device']['name']}, {comp[0]['extra'].get('load', '')}:\n")
        out.append(
            _table(
                [
                    "problem",
                    "backend",
                    "edges",
                    "eager step",
                    "first compiled call (compile + step)",
                    "second graph (1.5× edges)",
                    "compiled step",
                    "commit",
                ],
                rows,
            )
        )
    for r in (r for r in rs if r["extra"]["series"] == "graph preparation"):
        sp = r["spread"] or {}
        lo, hi = _g(sp.get("min", r["value"])), _g(sp.get("max", r["value"]))
        out.append(
            f"\nGraph preparation, {r['problem']}: {lo}–{hi} s "
            f"({r['extra'].get('what', '')}; the process's CPU time {r['extra'].get('process_cpu_time_s')} s; "
            f"{r['extra'].get('load', '')}), commit `{_commit(r)}`."
        )
    out.append("\nMeasured by:\n\n" + _provenance_note(rs) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n"


def tests_section(recs: List[Dict]) -> str:
    """Figures measured by the test suite's long tests (soak, slow, install)."""
    rs = newest(r for r in recs if r["kind"] == "test")
    if not rs:
        return "No test records.\n"
    rows = [
        [
            f"`{r['problem']}`",
            r["extra"].get("what", ""),
            r["metric"],
            f"{_g(r['value'])} {r['unit']}",
            _commit(r),
            r["date"][:10],
        ]
        for r in sorted(rs, key=lambda r: r["problem"])
    ]
    out = [_table(["test", "what", "metric", "value", "commit", "date"], rows)]
    out.append("\nMeasured by:\n\n" + _provenance_note(rs) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n"


def plots(dev: str, cases: Dict, plot_dir: str) -> List[Tuple[str, List[str]]]:
    """Time and peak memory against edges for the sweeps, and each provider's speedup over ``reference`` on every
    problem, for every provider in the records (one colour per provider). Returns (path, providers drawn) per plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    providers = sorted({k[2] for k in cases})
    colour = {p: f"C{i}" for i, p in enumerate(providers)}
    made = []
    drawn = set()
    sizes = defaultdict(set)
    for k in cases:
        if "@" in k[0]:
            sizes[k[0].split("@")[0]].add(k[0])
    families = sorted(f for f, ps in sizes.items() if len(ps) > 1)  # a sweep: two sizes or more
    if families:
        fig, axes = plt.subplots(2, len(families), figsize=(5.5 * len(families), 8), squeeze=False)
        for col, fam in enumerate(families):
            for row, (metric, label) in enumerate((("step_time", "time (s)"), ("peak_memory", "peak memory (MB)"))):
                ax = axes[row][col]
                for p in providers:
                    for mode, style in (("train", "-o"), ("inference", "--s")):
                        pts = sorted(
                            (_edges(m), m[metric]["value"])
                            for (pr, md, pv, _), m in cases.items()
                            if pr.startswith(fam + "@")
                            and pv == p
                            and md == mode
                            and metric in m
                            and m[metric]["value"] is not None
                            and _edges(m)
                        )
                        if pts:
                            ax.plot(*zip(*pts), style, color=colour[p], label=f"{p} ({mode})")
                            drawn.add(p)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("edges")
                ax.set_ylabel(label)
                ax.set_title(f"{fam}: {label}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"{dev}: newest record of each case")
        fig.tight_layout()
        path = os.path.join(plot_dir, f"{slug}-sweep.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        made.append((path, sorted(drawn)))
    bars = []  # (label, provider, speedup over reference)
    for (problem, mode, p, _), m in sorted(cases.items(), key=lambda kv: (_problem_order(kv[0][0]), kv[0][1])):
        ref = cases.get((problem, mode, "reference", _))
        if p == "reference" or ref is None or "step_time" not in m or "step_time" not in ref:
            continue
        a, b = ref["step_time"]["value"], m["step_time"]["value"]
        if a and b:
            bars.append((f"{problem}\n{mode}", p, a / b))
    if bars:
        labels = list(dict.fromkeys(b[0] for b in bars))
        others = [p for p in providers if any(b[1] == p for b in bars)]
        width = 0.8 / len(others)
        fig, ax = plt.subplots(figsize=(max(7, len(labels) * 0.8), 4.5))
        for j, p in enumerate(others):
            xs = [labels.index(lbl) + (j - (len(others) - 1) / 2) * width for lbl, q, _ in bars if q == p]
            ax.bar(xs, [v for _, q, v in bars if q == p], width=width, color=colour[p], label=p)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("speedup over reference (×)")
        ax.set_title(f"{dev}: speedup over the reference backend (newest record of each case)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(plot_dir, f"{slug}-speedup.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        made.append((path, ["reference", *others]))
    return made


# ----------------------------------------------------------------------------------------------------- compile


def _variant(group: List[Dict]) -> Dict[int, str]:
    """Per entry of one kernel, the constexprs that tell it apart from the same kernel's other launches of the same
    problem and precision (e.g. the statistics kernel of layer 1 and of layer 2)."""
    by = defaultdict(list)
    for r in group:
        by[(r["problem"], r["precision"])].append(r)
    keys = set()
    for rs in by.values():
        cs = [r["extra"].get("constexprs", {}) for r in rs]
        keys |= {k for k in set().union(*cs) if len({json.dumps(c.get(k)) for c in cs}) > 1}
    return {
        r["extra"]["entry"]: ", ".join(f"{k}={r['extra']['constexprs'].get(k)}" for k in sorted(keys))
        for r in group
        if "constexprs" in r["extra"]
    }


MMA_NOTE = (
    "the HMMA / HGMMA / ... instructions in the kernel's SASS, each counted once where it appears in the code "
    "(a static count, not how often they run)."
)


def compile_section(recs: List[Dict]) -> str:
    """Per toolchain (results file): registers / stack (B per thread) / shared memory (B) of every kernel."""
    comp = [r for r in recs if r["kind"] == "compile" and "entry" in r["extra"]]
    out = []
    first = newest(r for r in recs if r["kind"] == "compile" and "entry" not in r["extra"])
    if first:  # python -m ik_fast.tools.bench --precompile: one step's time per problem, precision and mode
        rows = [
            [
                f"`{r['problem']}`",
                f"`{r['provider']}`",
                r["precision"],
                r["mode"],
                r["metric"],
                _g(r["value"]) if r["value"] is not None else f"failed: {r.get('error', '')}",
                _commit(r),
            ]
            for r in sorted(
                first, key=lambda r: (r["device"]["name"], _problem_order(r["problem"]), r["precision"], r["mode"])
            )
        ]
        out.append(f"#### Compilation steps, {first[0]['device']['name']}\n")
        out.append(_table(["problem", "provider", "precision", "mode", "metric", "value (s)", "commit"], rows))
        out.append("\nMeasured by:\n\n" + _provenance_note(first) + "\n")
    for path, dev in sorted({(r["_file"], r["device"]["name"]) for r in comp}):
        rs = [r for r in comp if r["_file"] == path and r["device"]["name"] == dev]
        entries = defaultdict(dict)
        for r in rs:
            entries[r["extra"]["entry"]][r["metric"]] = r
        has = {r["metric"] for r in rs if r["value"] is not None}
        if rs[0]["provider"] == "triton":
            full = [m["registers"] for m in entries.values() if "registers" in m]
            variants = {}
            for kernel in {r["extra"]["kernel"] for r in full}:
                variants.update(_variant([r for r in full if r["extra"]["kernel"] == kernel]))
            precs = [p for p in ("ieee", "tf32", "bf16") if any(r["precision"] == p for r in full)]
            problems = sorted({r["problem"] for r in full}, key=_problem_order)
            fields = [k for k in ("registers", "stack_bytes", "shared_bytes", "mma_instructions") if k in has]
            cells = defaultdict(dict)
            for e, m in entries.items():
                reg = m.get("registers")
                if reg is None:
                    continue
                row = (reg["extra"]["kernel"], variants.get(e, ""), reg["extra"].get("num_warps"))
                if reg["value"] is None:
                    cell = "failed"
                else:
                    cell = "/".join(_g(m[k]["value"]) if k in m and m[k]["value"] is not None else "?" for k in fields)
                    spills = [m[k]["value"] or 0 if k in m else 0 for k in ("spill_stores", "spill_loads")]
                    cell += f" (spills: {_g(spills[0])} B stored / {_g(spills[1])} B loaded)" if any(spills) else ""
                cells[row][(reg["problem"], reg["precision"])] = cell
            rows = []
            for (kernel, variant, warps), c in sorted(cells.items(), key=lambda kv: (*kv[0][:2], kv[0][2] or 0)):
                name = f"`{kernel}`" + (f" ({variant})" if variant else "") + f", {warps} warps"
                rows.append([name] + [" · ".join(c.get((pb, p), "–") for p in precs) for pb in problems])
            ptxas = rs[0]["stack"].get("cuda")
            toolchain = f"Triton {rs[0]['stack']['triton']}" + (f" ({ptxas})" if ptxas else "")
            names = {
                "registers": "registers",
                "stack_bytes": "stack (B per thread)",
                "shared_bytes": "shared memory (B)",
                "mma_instructions": "tensor-core instructions",
            }
            out.append(f"#### {toolchain}, {dev}\n")
            head = " / ".join(names[k] for k in fields)
            out.append(f"{head[0].upper() + head[1:]}, {' · '.join(precs)}:\n")
            out.append(_table(["kernel", *problems], rows))
            failed = [r for r in full if r["value"] is None]
            if failed:
                out.append(
                    "\n"
                    + "\n".join(
                        f"- `{r['extra']['kernel']}` ({r['problem']}, {r['precision']}) failed: "
                        f"{' '.join(r.get('error', '').split())[:300]}"
                        for r in failed
                    )
                )
        else:
            rows = []
            cols = [
                k
                for k in ("registers", "stack_bytes", "spill_stores", "spill_loads", "shared_bytes", "mma_instructions")
                if k in has
            ] or ["registers"]
            for _, m in sorted(entries.items()):
                reg = m.get("registers")
                if reg is None:
                    continue
                name = f"`{reg['problem']}`" + (
                    "" if reg["extra"].get("entry_function", True) else " (device function)"
                )
                if reg["value"] is None:
                    error = " ".join(reg.get("error", "").split())[:200]
                    rows.append([name, reg["extra"].get("file", ""), f"failed: {error}", *[""] * (len(cols) - 1)])
                    continue
                rows.append(
                    [
                        name,
                        reg["extra"].get("file", ""),
                        *[_g(m[k]["value"]) if k in m and m[k]["value"] is not None else "" for k in cols],
                    ]
                )
            names = {
                "registers": "registers",
                "stack_bytes": "stack (B)",
                "spill_stores": "spill stores (B)",
                "spill_loads": "spill loads (B)",
                "shared_bytes": "shared memory (B)",
                "mma_instructions": "tensor-core instructions",
            }
            out.append(f"#### {rs[0]['provider']} CUDA kernels ({rs[0]['stack'].get('cuda')}), {dev}\n")
            out.append(_table(["kernel", "file", *[names[k] for k in cols]], rows))
        if "mma_instructions" in has:
            out.append("\nTensor-core instructions: " + MMA_NOTE)
        out.append("\nMeasured by:\n\n" + _provenance_note(rs) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n" if out else "No compile records.\n"


# ----------------------------------------------------------------------------------------------------- precision


def precision_section(recs: List[Dict]) -> str:
    """Relative error of the output / the gradient to x / the gradient to the kernel's parameters."""
    prec = newest(r for r in recs if r["kind"] == "precision")
    if not prec:
        return "No precision records.\n"
    out = []
    for (dev, problem), rs in sorted(_group(prec, lambda r: (r["device"]["name"], r["problem"])).items()):
        cols = sorted({(r["precision"], r["mode"]) for r in rs}, key=lambda c: (c[0] != "ieee", c[0], c[1] != "train"))
        rows = []
        for provider in sorted({r["provider"] for r in rs}, key=lambda p: (p == "reference", p)):
            row = [f"`{provider}`"]
            for p, mode in cols:
                v = {r["metric"]: r for r in rs if (r["provider"], r["precision"], r["mode"]) == (provider, p, mode)}
                row.append(
                    " / ".join(
                        "–" if k not in v else "failed" if v[k]["value"] is None else f"{v[k]['value']:.1e}"
                        for k in ("rel_error_out", "rel_error_grad_x", "rel_error_grad_params")
                    )
                )
            rows.append(row)
        failed = {(r["provider"], r["precision"], r["mode"]): r.get("error", "") for r in rs if r["value"] is None}
        out.append(
            f"Problem `{problem}`, {dev}; relative error of the output / the gradient to x / the gradient to "
            f"the kernel's parameters against {rs[0]['extra'].get('against', 'float64')}:\n"
        )
        out.append(_table(["backend", *[f"{p}, {m}" for p, m in cols]], rows))
        if failed:
            out.append(
                "\n"
                + "\n".join(
                    f"- `{pv}`, {p}, {m} failed: {' '.join(err.split())[:300]}"
                    for (pv, p, m), err in sorted(failed.items())
                )
            )
        out.append("\nMeasured by:\n\n" + _provenance_note(rs) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n"


def _group(rs, key):
    out = defaultdict(list)
    for r in rs:
        out[key(r)].append(r)
    return out


# ----------------------------------------------------------------------------------------------------- work


def work_section(recs: List[Dict]) -> str:
    """Counted multiply-adds per edge of a training step against the structured floor, and aten events per step."""
    # counts do not depend on the machine: the newest per problem, provider and metric, whatever the device; a count
    # (a value) before a run that counted none (e.g. --aten-only)
    key = ("problem", "provider", "mode", "metric")
    work = newest((r for r in recs if r["kind"] == "work" and r["value"] is not None), key)
    have = {tuple(r[f] for f in key) for r in work}
    work += [
        r
        for r in newest((r for r in recs if r["kind"] == "work" and r["value"] is None), key)
        if tuple(r[f] for f in key) not in have
    ]
    if not work:
        return "No work records.\n"
    rows = []
    cases = _group(work, lambda r: (r["problem"], r["provider"]))
    for (problem, provider), rs in sorted(cases.items(), key=lambda kv: (_problem_order(kv[0][0]), kv[0][1])):
        m = {r["metric"]: r for r in rs}
        macs, aten = m.get("macs_per_edge"), m.get("aten_ops")
        if macs is None:
            continue
        ex = macs["extra"]
        edges = ex.get("edges", [])
        edges = " → ".join(f"{e:,}" for e in edges) if isinstance(edges, list) else f"{edges:,}"
        if aten:
            counts = " / ".join(str(v) for v in aten["extra"]["aten_ops_at_edges"].values())
        else:
            counts = " / ".join(str(v) for v in ex.get("aten_ops", []))
        floor = ex.get("floor_per_edge")
        if macs["value"] is None:
            rows.append(
                [
                    problem,
                    f"`{provider}`",
                    edges,
                    f"not counted: {macs.get('error', '')}",
                    "",
                    "",
                    counts,
                    _commit(macs),
                ]
            )
            continue
        rows.append(
            [
                problem,
                f"`{provider}`",
                edges,
                f"{macs['value']:,.0f}",
                f"{floor:,}" if floor else "",
                f"{macs['value'] / floor:.2f}×" if floor else "",
                counts,
                _commit(macs),
            ]
        )
    out = [
        _table(
            [
                "problem",
                "provider",
                "edges",
                "counted MACs / edge",
                "floor / edge",
                "ratio",
                "aten events per step",
                "commit",
            ],
            rows,
        )
    ]
    out.append("\nMeasured by:\n\n" + _provenance_note(work) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n"


# ----------------------------------------------------------------------------------------------------- equivariance


def equivariance_section(recs: List[Dict]) -> str:
    """Largest relative equivariance error per group, on random and on exact elements, and per sampling grid."""
    eq = newest((r for r in recs if r["kind"] == "equivariance"), extra_key=("grid",))
    if not eq:
        return "No equivariance records.\n"
    groups = _group([r for r in eq if "grid" not in r["extra"]], lambda r: (r["problem"], r["precision"]))
    rows = []
    for (problem, prec), rs in groups.items():
        m = {r["metric"]: r for r in rs}
        rnd, exact = m.get("rel_error_random_elements"), m.get("rel_error_exact_elements")
        rows.append(
            [
                rs[0]["extra"].get("group", ""),
                f"`{problem}`",
                prec,
                f"{rnd['value']:.1e}" if rnd else "–",
                f"{exact['value']:.1e}" if exact else "–",
                _commit(rs[0]),
            ]
        )
    head = ["group", "gspace", "precision", "random elements", "exact elements", "commit"]
    out = [_table(head, rows)] if rows else []  # a file of grid records alone has none
    grids = [r for r in eq if "grid" in r["extra"]]
    if grids:
        rows = [
            [
                f"`{r['extra']['grid']}`",
                r["extra"].get("grid_elements", ""),
                f"{r['spread']['min']:.1e}–{r['spread']['max']:.1e}" if r["spread"] else f"{r['value']:.1e}",
                _commit(r),
            ]
            for r in grids
        ]
        out.append(
            f"\nSampling grids, problem `{grids[0]['problem']}` ({grids[0]['extra'].get('command', '')}), "
            f"{grids[0]['precision']}, random elements, range over seeds:\n"
        )
        out.append(_table(["grid", "G", "error", "commit"], rows))
    out.append("\nMeasured by:\n\n" + _provenance_note(eq) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n"


# ----------------------------------------------------------------------------------------------------- training


def training_section(recs: List[Dict]) -> str:
    """Validation error against the baseline, and cost, of the trainer's runs."""
    tr = newest((r for r in recs if r["kind"] == "training"), extra_key=("seed",))
    if not tr:
        return "No training records.\n"
    rows, cost, other = [], [], []
    for r in sorted(tr, key=lambda r: (r["problem"], r["provider"], r["metric"], r["extra"].get("seed", -1))):
        ex = r["extra"]
        if r["metric"] in ("val_mae", "val_mse"):
            test = ex.get("test_mae", ex.get("test_mse"))
            value = f"{_g(r['value'], 4)}" + (f" {r['unit']}" if r["unit"] != "1" else "")
            rows.append(
                [
                    f"`{r['problem']}`",
                    f"`{r['provider']}`",
                    r["metric"],
                    "" if ex.get("seed") is None else str(ex["seed"]),
                    value,
                    _g(ex.get("baseline"), 4),
                    f"{r['value'] / ex['baseline']:.2f}" if ex.get("baseline") else "",
                    _g(test, 4) if test is not None else "",
                    _g(ex.get("test_baseline"), 4),
                    _commit(r),
                ]
            )
        elif r["metric"] == "cpu_time":
            cost.append(
                [
                    f"`{r['provider']}`",
                    f"{_g(r['value'])} s",
                    f"{ex.get('peak_rss_mib', '')} MiB",
                    f"{ex.get('wall_s', '')} s",
                    _g(ex.get("val_mae"), 4),
                    _commit(r),
                ]
            )
        else:
            other.append(
                f"- `{r['problem']}`: {r['metric']} = {_g(r['value'])} ({ex.get('what', '')}; "
                f"`{ex.get('command', '')}`), commit `{_commit(r)}`"
            )
    out = [
        _table(
            [
                "run",
                "backend",
                "metric",
                "seed",
                "value",
                "baseline",
                "value / baseline",
                "test",
                "test baseline",
                "commit",
            ],
            rows,
        )
    ]
    if cost:
        out.append(f"\nCost of one quick QM9 run ({tr[0]['device']['name']}):\n")
        out.append(_table(["backend", "CPU time (user)", "peak RSS", "wall", "val MAE (meV)", "commit"], cost))
    if other:
        out.append("\n" + "\n".join(other))
    out.append("\nMeasured by:\n\n" + _provenance_note(tr) + "\n")
    return "\n".join(out) + "\n" + DIRTY + "\n"


# ----------------------------------------------------------------------------------------------------- nonlinearities

# the implicit kernels' hidden nonlinearities (ik_fast.spec.kernel.NONLINEARITIES; the report imports no torch), the
# default first. A problem names its nonlinearity as BASE+KIND (``M+gated``, ``qm9-homo-quick+norm``), the default
# none (or a record's ``extra.nonlinearity`` says which).
NONLINEARITIES = ("fourier_elu", "gated", "norm")
# the trainer's quick presets: (problem, metric, column); their records carry ``extra.seed`` and ``extra.nonlinearity``
NL_TRAINING = (
    ("qm9-homo-quick", "val_mae", "QM9 quick: val MAE (meV)"),
    ("nbody-quick", "val_mse", "N-body quick: val MSE"),
)
NL_EQUIVARIANCE = "flipRot3dOnR3"  # the equivariance records' problem (the gspace): O(3), random elements
NL_KERNEL_PROBLEMS = ("M", "H")  # counted work and CPU step time of one layer (ik_fast.tools.problems)


def _nl_problem(base: str, kind: str) -> str:
    return base if kind == NONLINEARITIES[0] else f"{base}+{kind}"


def _nl_is(r: Dict, base: str, kind: str) -> bool:
    """Whether record ``r`` measures problem ``base`` with the nonlinearity ``kind``."""
    named = r["extra"].get("nonlinearity")
    if r["problem"] == base:
        return (named or NONLINEARITIES[0]) == kind
    return r["problem"] == _nl_problem(base, kind) and named in (None, kind)


def _commits(rs: List[Dict]) -> str:
    return ", ".join(f"`{c}`" for c in sorted({_commit(r) for r in rs}))


def _nl_training_cell(recs: List[Dict], base: str, metric: str, kind: str) -> str:
    """Mean ± half the range (max - min) / 2 over seeds of the newest record per seed; only records that name
    their seed and nonlinearity (a seed series), so that older single runs are not mixed in."""
    rs = [
        r
        for r in recs
        if r["kind"] == "training"
        and r["metric"] == metric
        and r["value"] is not None
        and "seed" in r["extra"]
        and "nonlinearity" in r["extra"]
        and _nl_is(r, base, kind)
    ]
    rs = newest(rs, key=("problem", "metric"), extra_key=("seed",))
    if not rs:
        return "–"
    v = [r["value"] for r in rs]
    mean, half = sum(v) / len(v), (max(v) - min(v)) / 2
    f = ".4f" if metric == "val_mse" else ".1f"
    return f"{mean:{f}} ± {half:{f}} (n={len(v)}) {_commits(rs)}"


def _nl_best_cell(recs: List[Dict], base: str, kind: str, want, fmt, precision: Optional[str] = None) -> str:
    """The smallest value among the newest records per provider that ``want`` accepts, with its provider; of
    ``precision`` where records of it exist (then named)."""
    rs = newest(
        r for r in recs if want(r) and r["value"] is not None and "series" not in r["extra"] and _nl_is(r, base, kind)
    )
    if precision is not None:
        rs = [r for r in rs if r["precision"] == precision] or rs
    if not rs:
        return "–"
    r = min(rs, key=lambda r: r["value"])
    how = f"`{r['provider']}`" + (f", {r['precision']}" if precision is not None else "")
    floor = r["extra"].get("floor_per_edge") if r["kind"] == "work" else None
    of = "" if floor is None else f" / floor {floor:,.0f}"  # (the structured floor of its kind: ik_fast.tools.cases)
    return f"{fmt(r['value'])}{of} ({how}) `{_commit(r)}`"


def nonlinearities_section(recs: List[Dict]) -> str:
    """Per hidden nonlinearity of the implicit kernels: the quick presets' validation errors over seeds, the
    equivariance error, the counted work per edge and the CPU step time (each "–" until a record measures it)."""
    if not any(r["kind"] == "training" and "nonlinearity" in r["extra"] and "seed" in r["extra"] for r in recs):
        return "No training records per nonlinearity.\n"
    head = [
        "kernel nonlinearity",
        *[col for _, _, col in NL_TRAINING],
        "equivariance error (O(3), random elements)",
        *[f"MACs / edge / floor, `{p}`" for p in NL_KERNEL_PROBLEMS],
        *[f"CPU step (s), `{p}`" for p in NL_KERNEL_PROBLEMS],
    ]
    rows = []
    for kind in NONLINEARITIES:
        row = [kind + (" (default)" if kind == NONLINEARITIES[0] else "")]
        row += [_nl_training_cell(recs, base, metric, kind) for base, metric, _ in NL_TRAINING]
        row.append(
            _nl_best_cell(
                recs,
                NL_EQUIVARIANCE,
                kind,
                lambda r: (
                    r["kind"] == "equivariance"
                    and r["metric"] == "rel_error_random_elements"
                    and "grid" not in r["extra"]
                ),
                lambda v: f"{v:.1e}",
                precision="float64",
            )
        )
        row += [
            _nl_best_cell(
                recs,
                p,
                kind,
                lambda r: r["kind"] == "work" and r["metric"] == "macs_per_edge",
                lambda v: f"{v:,.0f}",
            )
            for p in NL_KERNEL_PROBLEMS
        ]
        row += [
            _nl_best_cell(
                recs,
                p,
                kind,
                lambda r: (
                    r["kind"] == "timing"
                    and r["metric"] == "step_time"
                    and r["mode"] == "train"
                    and r["device"]["type"] == "cpu"
                ),
                _g,
            )
            for p in NL_KERNEL_PROBLEMS
        ]
        rows.append(row)
    lead = (
        "Per hidden nonlinearity of the implicit kernels (`nonlinearity=`; `gated` and `norm` exactly equivariant): "
        "the quick presets' validation error, mean ± half the range (max − min) / 2 over seeds (n), "
        "`python -m ik_fast.models.train {qm9|nbody} --quick --seed S --nonlinearity K`; the equivariance error, the "
        "counted multiply-adds per edge of a training step (with the structured floor of its nonlinearity, "
        "docs/design.md) and the CPU training step of one layer, the smallest over backends; each figure with the "
        "commits that measured it, – where no record has it yet:\n"
    )
    return lead + "\n" + _table(head, rows) + "\n"


# ----------------------------------------------------------------------------------------------------- entry


# the goals for the model's lower bound per fused backend and step (M and H alike)
MODEL_GOALS = {"tf32": 5e-3, "tf32x3": 12e-3}
MODEL_CALIBRATION_COMMIT = "606a722"  # the tree GPU-PREDICTION.md read


def gpu_model_section(recs: List[Dict], kernels: bool = True) -> str:
    """The static GPU model (``benchmarks/gpu_model.py``, kind ``model``): lower-bound step time on an H100 per problem
    and precision beside the goals, per kernel (``kernels``), and the calibration against the prediction."""
    model = [r for r in recs if r["kind"] == "model"]
    if not model:
        return "No model records.\n"
    today = newest(
        r for r in model if r["metric"] == "step_time_bound" and not r["commit"].startswith(MODEL_CALIBRATION_COMMIT)
    )
    out = [
        "**Static GPU model — a model, not a measurement**: lower-bound time of one training step (one layer, "
        "forward + backward) on an H100 SXM (`benchmarks/gpu_model.py`). Triton backend: from the sm_90 SASS of "
        "every kernel with trip counts from execution, per kernel the larger of issue (4 warp-instructions per clock "
        "per SM at 1.98 GHz), L2 (32-byte sectors per warp-wide request at 5.5 TB/s) and tensor-core time, summed. "
        "Native backend (coarse, no per-loop trip counts): per kernel the largest of issue (its replayed FFMA / HMMA "
        "over their densest share of its SASS), tensor-core time of its replayed multiply-adds and its compulsory L2 "
        "sectors. ATen passes not counted. "
        "Computed on a CPU; replaced by measurements when a GPU runs.\n"
    ]
    rows = []

    def backend(r):
        return "native" if r["provider"] == "native" else f"triton {r['stack'].get('triton') or ''}".strip()

    for r in sorted(today, key=lambda r: (r["problem"], r["precision"], backend(r))):
        st = r["extra"]["step"]
        goal = MODEL_GOALS.get(r["precision"])
        met = "" if goal is None else (" ✓" if r["value"] <= goal else " ✗")
        rows.append(
            [
                r["problem"],
                r["precision"],
                backend(r),
                f"{st['t_issue'] * 1e3:.2f}",
                f"{st['t_memory'] * 1e3:.2f}",
                f"{st['t_tensor'] * 1e3:.2f}",
                f"**{r['value'] * 1e3:.2f}**",
                "–" if goal is None else f"≤ {goal * 1e3:g}{met}",
                f"`{_commit(r)}`",
            ]
        )
    out.append(
        _table(
            ["problem", "precision", "backend", "issue ms", "L2 ms", "tensor ms", "bound ms", "goal ms", "commit"],
            rows,
        )
        + "\n"
    )
    if kernels:
        krecs = newest(
            (
                r
                for r in model
                if r["metric"] == "kernel_time_bound" and not r["commit"].startswith(MODEL_CALIBRATION_COMMIT)
            ),
            extra_key=("kernel",),
        )
        krows = []
        for r in sorted(
            krecs,
            key=lambda r: (r["problem"], r["precision"], backend(r), -(r["value"] or 0)),
        ):
            e = r["extra"]
            krows.append(
                [
                    r["problem"],
                    r["precision"],
                    backend(r),
                    e["kernel"],
                    "" if e.get("registers") is None else f"{e['registers']} / {e.get('stack_bytes', 0)}",
                    "–" if e.get("warp_instructions") is None else f"{e['warp_instructions']:.3g}",
                    "–" if e.get("tc_ratio") is None else f"{e['tc_ratio']:.2f}×",
                    f"{e.get('warp_sectors', e['sectors']):.3g}",
                    "–" if e.get("efficiency") is None else f"{e['efficiency']:.0%}",
                    "" if r["value"] is None else f"{r['value'] * 1e3:.2f}",
                    f"`{_commit(r)}`",
                ]
            )
        out.append(
            "Per kernel (warp-instructions and 32-byte sectors per step at the full problem, sectors per warp-wide "
            "request where the record has them; MMA vs ideal: the tensor-core instructions' multiply-adds over the "
            "dots' M x N x K, x3 in 3xTF32; efficiency: useful bytes over sectors x 32 B per block access; native: "
            "its replayed stages):\n"
        )
        out.append(
            _table(
                [
                    "problem",
                    "precision",
                    "backend",
                    "kernel",
                    "regs / stack B",
                    "warp-instr",
                    "MMA vs ideal",
                    "sectors",
                    "efficiency",
                    "bound ms",
                    "commit",
                ],
                krows,
            )
            + "\n"
        )
        cal = newest((r for r in model if r["metric"] == "calibration_ratio"), extra_key=("kernel", "quantity"))
        if cal:
            crows = [
                [
                    r["problem"],
                    r["precision"],
                    r["extra"]["kernel"],
                    r["extra"]["quantity"],
                    f"{r['extra']['predicted']:.3g}",
                    f"{r['extra']['model']:.3g}",
                    f"{r['value']:.2f}" + ("" if abs(r["value"] - 1) <= 0.3 else " (outside ±30 %)"),
                    f"`{_commit(r)}`",
                ]
                for r in sorted(
                    cal, key=lambda r: (r["problem"], r["precision"], r["extra"]["quantity"], r["extra"]["kernel"])
                )
            ]
            out.append(
                "Calibration: the model run on the kernels the static prediction read (its commit, Triton 3.6) "
                "against the prediction's per-kernel warp-instructions (its tables 3.1 and 3.2) and contraction "
                "sectors (its appendix B):\n"
            )
            out.append(
                _table(
                    [
                        "problem",
                        "precision",
                        "kernel",
                        "quantity",
                        "prediction",
                        "model",
                        "model / prediction",
                        "commit",
                    ],
                    crows,
                )
                + "\n"
            )
    return "\n".join(out)


def render(
    section: str, recs: Optional[List[Dict]] = None, plot_dir: Optional[str] = None, plot_prefix: str = ""
) -> str:
    """One section's Markdown (``SECTIONS``)."""
    recs = load_all() if recs is None else recs
    if section == "timing":
        return timing_section(recs, plot_dir, plot_prefix)
    fn = {
        "summary": summary_section,
        "spread": spread_section,
        "compile": compile_section,
        "precision": precision_section,
        "work": work_section,
        "equivariance": equivariance_section,
        "training": training_section,
        "nonlinearities": nonlinearities_section,
        "threads": threads_section,
        "compile_timing": compile_timing_section,
        "tests": tests_section,
        "gpu_model": gpu_model_section,
    }.get(section)
    if fn is None:
        raise ValueError(f"unknown section {section!r}; one of {SECTIONS}")
    return fn(recs)


def update_readme(path: str = README) -> None:
    """Replace the README's block between the results markers by the summary (appended when absent)."""
    with open(path) as f:
        text = f.read()
    block = f"{START}\n{render('summary')}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sections", nargs="*", choices=[[], *SECTIONS], help="sections to print (default: all)")
    ap.add_argument("--plots", metavar="DIR", help="write the timing plots into DIR")
    ap.add_argument("--readme", action="store_true", help="update README.md's results block with the summary")
    args = ap.parse_args(argv)
    if args.readme:
        update_readme()
        print("README.md results block updated")
        return 0
    recs = load_all()
    for s in args.sections or SECTIONS:
        print(f"## {s}\n\n{render(s, recs, args.plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
