"""One-off: the measurement files of five older schemas, rewritten as records of ``ik_fast.records``.

    python benchmarks/migrate_records.py        # reads the old files from git (commit SOURCE), writes the new ones

The old files carried no commit: each record gets the commit recovered from git history. The file was last written
(content, not a rename) by commit X; when X changed nothing but README.md and benchmarks/results/, the measured code is
X's parent's (X only committed the figures), else X itself (X also changed code the measurement runs: the figures
were measured on its tree before it was committed). Whether that tree had other changes was not recorded: ``dirty``
is true and ``extra.dirty_note`` says so. Superseded snapshots are not migrated (git keeps them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ik_fast import records  # noqa: E402

SOURCE = "be13b85251737a1612b9caf25626f81eac645491"  # the last commit with the old files
OLD = "benchmarks/results/"
CPU = {"type": "cpu", "name": "AMD EPYC (2 threads)"}
SM90 = {"type": "cuda", "name": "sm_90 (compiled on a CPU machine, not run)"}
DIRTY_NOTE = "not recorded: the old record had no provenance; assumed dirty"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def old(name: str):
    return json.loads(git("show", f"{SOURCE}:{OLD}{name}"))


def recover(name: str, which: str = "last"):
    """(commit, how) for an old results file: see the module docstring."""
    writers, commit = [], None
    for line in git("log", "--follow", "--format=%H", "--numstat", SOURCE, "--", OLD + name).splitlines():
        if "\t" in line:
            added, deleted = line.split("\t")[:2]
            if int(added) + int(deleted):  # content written, not only renamed
                writers.append(commit)
        elif line.strip():
            commit = line.strip()
    writer = writers[0] if which == "last" else writers[-1]
    changed = git("show", "--name-only", "--format=", writer).split()
    code = [f for f in changed if f != "README.md" and not f.startswith(OLD)]
    if code:
        return writer, (f"the commit that wrote {OLD}{name} ({writer[:7]}); it also changed {', '.join(code)}, "
                        "so the figures were measured on its tree")
    parent = git("rev-parse", f"{writer}^").strip()
    return parent, (f"the parent of the commit that wrote {OLD}{name} ({writer[:7]}, which changed only README.md "
                    "and benchmarks/results/)")


def base(kind, commit, how, date, device, stack, source):
    return {"commit": commit, "dirty": True, "date": date, "device": device, "stack": stack,
            "_kind": kind, "_extra": {"commit_recovered": how, "dirty_note": DIRTY_NOTE, "migrated_from": source}}


def rec(b, problem, provider, metric, value, unit, mode="", precision="", spread=None, extra=None, error=None):
    r = {"kind": b["_kind"], **{k: b[k] for k in ("commit", "dirty", "date", "device", "stack")}, "problem": problem,
         "provider": provider, "mode": mode, "precision": precision, "metric": metric,
         "value": None if value is None else float(value), "unit": unit, "spread": spread,
         "extra": {**(extra or {}), **b["_extra"]}}
    if error is not None:
        r["error"] = error
    records.validate_record(r)
    return r


def stack_of(env):
    return {"python": env["python"], "torch": env["torch"], "triton": env.get("triton"), "escnn": env["escnn"],
            "numpy": env["numpy"], "cuda": None}


def timing(name, series=None, which="last"):
    data = old(name)
    env = data["environment"]
    commit, how = recover(name, which)
    b = base("timing", commit, how, env["date"], CPU, stack_of(env), name)
    runs = data["runs"] if "runs" in data else [{"command": data["command"], "records": data["records"]}]
    out = []
    for run in runs:
        for r in run["records"]:
            prec = {"float64": "float64"}.get(r["dtype"], "ieee" if env["float32_matmul_precision"] == "highest"
                                              else env["float32_matmul_precision"])
            common = {"edges": r.get("edges"), "nodes": r.get("nodes"), "dtype": r["dtype"], "threads": env["threads"],
                      "command": run["command"]}
            if "run" in run:
                common["run"] = run["run"]
                common["series"] = series
            if "error" in r:
                out.append(rec(b, r["problem"], r["provider"], "step_time", None, "s", r["mode"], prec,
                               extra=common, error=r["error"]))
                continue
            ex = {**common, "forward_s": r["forward_s"], "backward_s": r["backward_s"], "repeats": r["repeats"],
                  "warmup": r["warmup"], "flops": r["flops"], "flops_source": r.get("flops_source", "model"),
                  "description": r["description"]}
            for k in ("warmup_s", "floor_macs", "rounds_time_s"):
                if k in r:
                    ex[k] = r[k]
            out.append(rec(b, r["problem"], r["provider"], "step_time", r["time_s"], "s", r["mode"], prec,
                           {"p20": r["time_p20_s"], "p80": r["time_p80_s"], "n": r["repeats"]}, ex))
            out.append(rec(b, r["problem"], r["provider"], "peak_memory", r["peak_rss_mb"], "MB", r["mode"], prec,
                           extra={**common, "measure": "peak resident set of the case's process",
                                  "base_rss_mb": r["base_rss_mb"]}))
    return out


def triton_compile(name):
    data = old(name)
    commit, how = recover(name)
    stack = {"python": "unknown", "torch": "unknown", "triton": data["triton"], "escnn": None, "numpy": None,
             "cuda": None}
    b = base("compile", commit, how, "2026-11-28", SM90, stack, name)
    b["_extra"]["stack_note"] = "python and torch versions not recorded"
    out = []
    for i, r in enumerate(data["records"]):
        ident = {"kernel": r["kernel"], "entry": i, "num_warps": r["options"].get("num_warps")}
        full = {**ident, "note": data["note"], "module": r["module"], "constexprs": r["constexprs"], "graphs": r["graphs"],
                "compile_s": r["compile_s"], "local_bytes": r["local_bytes"], "max_stack": data["max_stack"],
                "shared_limit": data["shared_limit"]}
        out.append(rec(b, r["problem"], "triton", "registers", r["registers"], "count", precision=r["precision"],
                       extra=full))
        out.append(rec(b, r["problem"], "triton", "stack_bytes", r["stack_bytes"], "B", precision=r["precision"],
                       extra=ident))
        out.append(rec(b, r["problem"], "triton", "shared_bytes", r["shared_bytes"], "B",
                       precision=r["precision"], extra=ident))
    return out


def native_compile(name):
    data = old(name)
    commit, how = recover(name)
    stack = {"python": "unknown", "torch": "unknown", "triton": None, "escnn": None, "numpy": None,
             "cuda": data["nvcc"]}
    b = base("compile", commit, how, "2026-11-28", SM90, stack, name)
    b["_extra"]["stack_note"] = "python and torch versions not recorded; cuda is nvcc's build string"
    out = []
    for i, r in enumerate(data["records"]):
        short = r["kernel"].split("ik_fast_cuda::", 1)[1].split("(")[0]
        ident = {"kernel": short, "entry": i, "file": r["file"]}
        for metric, unit in (("registers", "count"), ("stack_bytes", "B"), ("spill_stores", "B"), ("spill_loads", "B"),
                             ("shared_bytes", "B")):
            extra = {**ident, "signature": r["kernel"], "compile_s": r["compile_s"]} if metric == "registers" else ident
            out.append(rec(b, short, "native", metric, r[metric], unit, extra=extra))
    return out


def precision(name):
    data = old(name)
    commit, how = recover(name)
    stack = {"python": "unknown", "torch": data["torch"], "triton": "unknown", "escnn": None, "numpy": None,
             "cuda": None}
    device = {"type": "cpu", "name": "CPU (model not recorded), Triton interpreter"}
    b = base("precision", commit, how, "2026-11-28", device, stack, name)
    b["_extra"]["stack_note"] = "python and triton versions not recorded"
    out = []
    for r in data["records"]:
        ex = {"edges": r["edges"], "seconds": r["seconds"], "against": "float64 evaluation of the same layer "
              "(reference backend)", "interpreter": data["interpreter"] == "1", "command": data["command"]}
        for metric, key in (("rel_error_out", "out"), ("rel_error_grad_x", "grad_x"),
                            ("rel_error_grad_params", "grad_params")):
            out.append(rec(b, r["problem"], r["backend"], metric, r[key], "1", "train" if r["training"] else "eval",
                           r["mode"], extra=ex))
    return out


def work_rows(b, rows, command, keep):
    out = []
    for r in rows:
        if r["provider"] not in keep or "macs_per_edge" not in r:
            continue
        ex = {"edges": r["edges"], "floor_per_edge": r["floor_per_edge"], "ratio_to_floor": r["ratio_to_floor"],
              "dot_macs_per_edge": r["dot_macs_per_edge"], "host_gemm_macs_per_edge": r["host_gemm_macs_per_edge"],
              "command": command, "what": "multiply-adds per edge of one training step: the slope between two graphs"}
        out.append(rec(b, r["problem"], r["provider"], "macs_per_edge", r["macs_per_edge"], "MAC", "train",
                       "ieee", extra=ex))
        out.append(rec(b, r["problem"], r["provider"], "aten_ops", r["aten_ops"][0], "count", "train", "ieee",
                       extra={"edges": r["edges"][0], "aten_ops_at_edges": dict(zip(map(str, r["edges"]),
                                                                                    r["aten_ops"])),
                              "what": "aten:: events of one training step on a new graph (nested included)",
                              "command": command}))
    return out


def work(name, keep, which="last"):
    data = old(name)
    commit, how = recover(name, which)
    stack = {"python": "unknown", "torch": "unknown", "triton": "3.9.0", "escnn": None, "numpy": None, "cuda": None}
    device = {"type": "cpu", "name": "AMD EPYC (2 threads), Triton interpreter"}
    b = base("work", commit, how, "2026-11-28", device, stack, name)
    b["_extra"]["stack_note"] = "python and torch versions not recorded"
    return work_rows(b, data["rows"], data["command"], keep)


SERIES = "five runs of the same command, one after another, right after 2026-11-29-native-rounds (same build)"
PLAN = [
    ("timing", "2026-11-27-suite-cpu", lambda: timing("cpu-amd-epyc-2-cores-2026-11-27.json")),
    ("timing", "2026-11-28-native-all-problems",
     lambda: timing("cpu-native-all-problems-packing-amd-epyc-2-cores-2026-11-28.json")),
    ("timing", "2026-11-29-native-others", lambda: timing("cpu-native-others-amd-epyc-2-cores-2026-11-29.json")),
    ("timing", "2026-11-29-native-rounds", lambda: timing("cpu-native-rounds-packing-amd-epyc-2-cores-2026-11-29.json")),
    ("timing", "2026-11-29-native-qm9-400-runs",
     lambda: timing("cpu-native-qm9-400-runs-amd-epyc-2-cores-2026-11-29.json", SERIES)),
    ("compile", "2026-11-28-triton-3.9", lambda: triton_compile("compile-sm90-v2-blocks-2026-11-28.json")),
    ("compile", "2026-11-28-triton-3.6", lambda: triton_compile("compile-sm90-triton-3.6-v2-blocks-2026-11-28.json")),
    ("compile", "2026-11-28-native-cuda", lambda: native_compile("compile-cuda-native-sm90-2026-11-28.json")),
    ("precision", "2026-11-28-triton-interpreter", lambda: precision("precision-cpu-interpreter-2026-11-28.json")),
    # the reference and torch rows only: its v1 triton rows are superseded by the next file's
    ("work", "2026-11-28-reference-torch",
     lambda: work("work-cpu-interpreter-2026-11-28.json", ("reference", "torch"), "first")),
    ("work", "2026-11-28-triton", lambda: work("work-cpu-interpreter-v2-blocks-2026-11-28.json", ("triton",))),
]


def main() -> int:
    for kind, name, make in PLAN:
        recs = make()
        slug = records.device_slug({"device": recs[0]["device"]})
        path = os.path.join(ROOT, "benchmarks", "results", kind, slug, f"{name}.json")
        records.write(path, recs)
        print(f"{os.path.relpath(path, ROOT)}: {len(recs)} records, commit {recs[0]['commit'][:7]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
