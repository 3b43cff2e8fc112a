"""The Python steps of benchmarks/run_gpu.sh (the bench steps are ``python -m ik_fast.tools.bench``):

``versions``  the device and the stack: Python, torch (its CUDA), Triton, NumPy, escnn, lie_learn, nvcc, the GPU,
              where ik_fast is imported from and the commit the records will carry.
``build``     the native extension as the package builds it on first use (the prebuilt ``ik_fast._C`` or the
              first-use build, ``ik_fast._native``): the seconds it took, or why it failed. One ``compile`` record.
``tests``     ``pytest`` with a per-test time limit and a deadline (tests/_time_limits.py), never stopping at the first
              failure; a process that dies in a hung test (faulthandler) is run again on the tests not yet run. A
              junit XML per pytest process and one ``test`` record per test (outcome, seconds, message).
``table``     the short table of a run: the build, the tests, each timing case.

Every results file goes through :mod:`ik_fast.records` to ``<results>/<kind>/<device>/<date>-<name>.json`` and,
with ``--copy-to``, to the same path under that folder the moment it is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(kind: str, name: str, recs, prov, args) -> str:
    from ik_fast.tools import bench

    path = bench.results_path(kind, name, prov, args.results)
    bench.write_results(path, recs, args.copy_to, args.results)
    print(f"results: {path}" + (f" (and under {args.copy_to})" if args.copy_to else ""), flush=True)
    return path


def _run(cmd, timeout=60):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(cmd)}: {exc})"
    return (res.stdout + res.stderr).strip()


def versions(args) -> int:
    import importlib.metadata as md

    print(f"python {platform.python_version()} ({sys.executable}), {platform.platform()}")
    for pkg in (
        "torch",
        "triton",
        "numpy",
        "scipy",
        "escnn",
        "lie_learn",
        "torch_geometric",
        "pytest",
        "ninja",
        "qm9pack",
    ):
        try:
            version = md.version(pkg)
        except md.PackageNotFoundError:
            try:  # a package put on the path by hand (the kit's lie_learn) has no metadata
                mod = __import__(pkg)
                version = f"{getattr(mod, '__version__', '?')} (no metadata; {os.path.dirname(mod.__file__)})"
            except Exception as exc:  # absent, or fails to import: both are worth seeing
                version = f"not importable ({type(exc).__name__}: {exc})"
        print(f"{pkg:16s} {version}")
    import torch

    import ik_fast
    from ik_fast.tools import bench

    print(f"ik_fast          {ik_fast.__version__} from {os.path.dirname(ik_fast.__file__)}")
    print(f"torch CUDA       {torch.version.cuda}, available: {torch.cuda.is_available()}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"WARNING: the run measures {args.device}, which this torch cannot use: every CUDA step will fail")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}           {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    print(f"nvcc             {_run(['nvcc', '--version']).splitlines()[-1] if shutil.which('nvcc') else 'absent'}")
    print(f"c++              {_run([os.environ.get('CXX', 'c++'), '--version']).splitlines()[0]}")
    if shutil.which("nvidia-smi"):
        print(_run(["nvidia-smi"]))
    for var in ("TRITON_INTERPRET", "IK_FAST_CACHE", "IK_FAST_TEST_DEVICE", "PYTHONPATH", "CUDA_HOME"):
        print(f"${var} = {os.environ.get(var)!r}")
    prov = bench.provenance(args.device)
    print(f"records: commit {prov['commit']} (dirty: {prov['dirty']}), device {prov['device']}, stack {prov['stack']}")
    if prov["commit"] == "unknown":
        print("WARNING: no commit (no .git here and IK_FAST_COMMIT unset): the records will say 'unknown'")
    return 0


def build(args) -> int:
    """Time the native extension's loading as the package does it on first use (prebuilt or compiled now)."""
    import torch  # noqa: F401  (imported before the clock starts: the build, not torch's import, is timed)

    from ik_fast import _native, backends, ops, records  # noqa: F401  (backends declares the implementations)
    from ik_fast.tools import bench

    prov = bench.provenance(args.device)
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        why = ops.status("native", args.device)
    seconds = time.perf_counter() - t0
    sys.stderr.write(err.getvalue())
    mod = _native.module()
    compiled_now = "compiling the native extension" in err.getvalue()
    extra = {
        "device": args.device,
        "seconds_until_failure": None if why is None else seconds,
        "module": getattr(mod, "__file__", None),
        "how": (
            "prebuilt ik_fast._C"
            if mod is not None and mod.__name__.endswith("._C")
            else "first-use build, compiled now"
            if compiled_now
            else "first-use build, from its cache"
            if mod is not None
            else "not loaded"
        ),
        "cuda_part": bool(mod.cuda_built()) if mod is not None and hasattr(mod, "cuda_built") else None,
    }
    rec = records.record(
        "compile", "csrc", "native", "build_time", None if why else seconds, "s", prov=prov, error=why, extra=extra
    )
    _write("compile", "native-build", [rec], prov, args)
    print(
        f"native on {args.device}: "
        + (
            f"ready after {seconds:.1f} s ({extra['how']}; CUDA part: {extra['cuda_part']})"
            if why is None
            else f"FAILED after {seconds:.1f} s: {why}"
        ),
        flush=True,
    )
    return 0 if why is None else 1


def _read_progress(path):
    """Per test id: its outcome (failed > skipped > passed over its phases), seconds, message; and the ids started
    but never done (the process died in them)."""
    tests, started, done = {}, [], set()
    if not os.path.exists(path):
        return tests, []
    with open(path) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line cut short by the process's end
            nid = ev["nodeid"]
            if ev["event"] == "start":
                started.append(nid)
            elif ev["event"] == "done":
                done.add(nid)
            else:
                t = tests.setdefault(nid, {"outcome": "passed", "duration": 0.0, "message": ""})
                t["duration"] += ev["duration"]
                rank = {"passed": 0, "skipped": 1, "failed": 2}
                outcome = ev["outcome"]
                if outcome == "failed" and ev["when"] != "call":
                    outcome = "error"  # a setup or teardown failure, as pytest counts it
                    rank["error"] = 3
                if rank.get(outcome, 2) > rank.get(t["outcome"], 0):
                    t["outcome"], t["message"] = outcome, ev["message"]
    return tests, [n for n in started if n not in done]


def tests(args) -> int:
    """pytest in a child process, again on the tests not yet run when one dies in a hung test."""
    from ik_fast import records
    from ik_fast.tools import bench

    os.makedirs(args.out_dir, exist_ok=True)
    prov = bench.provenance(args.device)
    env = dict(os.environ, IK_FAST_TEST_TIMEOUT=str(args.per_test), IK_FAST_TEST_DEADLINE=str(args.deadline))
    outcomes, hung, ran = {}, [], []
    attempt, rc = 0, 0
    while True:
        attempt += 1
        progress = os.path.join(args.out_dir, f"progress-{attempt}.jsonl")
        junit = os.path.join(args.out_dir, "gpu-tests.xml" if attempt == 1 else f"gpu-tests-{attempt}.xml")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *args.pytest_args,
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *[f"--deselect={n}" for n in ran],
        ]
        print(f"$ {' '.join(cmd)}", flush=True)
        env["IK_FAST_TEST_PROGRESS"] = progress
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)

        def stop(signum, frame, proc=proc):  # SIGTERM (run_gpu.sh's step deadline): pytest and what it started too
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        # the tests end by the deadline; a test stuck in native code ends its process a grace period later
        limit = max(30.0, args.deadline - time.time()) + min(60.0, max(5.0, args.per_test)) + 30
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            print(f"pytest did not end {limit:.0f} s after it started: killed", flush=True)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        got, died_in = _read_progress(progress)
        outcomes.update(got)
        ran += list(got) + [n for n in died_in if n not in got]
        if not died_in:  # pytest ended by itself (a test that died with it is left 'started', never 'done')
            break
        if os.path.exists(progress + ".stacks"):
            with open(progress + ".stacks") as f:
                print(f"the stacks when the process was ended:\n{f.read()}", flush=True)
        for nid in died_in:
            hung.append(nid)
            outcomes[nid] = {
                "outcome": "hung",
                "duration": None,
                "message": f"the test did not return within its limit and the grace period after it: "
                f"its pytest process was ended (exit status {rc}); the stacks are in the log",
            }
        print(f"pytest ended in {', '.join(died_in)} (exit status {rc}); running the tests not yet run", flush=True)
        if time.time() >= args.deadline or attempt >= 5:
            break
    recs = [
        records.record(
            "test",
            nid,
            "pytest",
            "duration",
            t["duration"],
            "s",
            prov=prov,
            error=None if t["duration"] is not None else t["message"],
            extra={"outcome": t["outcome"], "message": t["message"][-2000:], "device": args.device},
        )
        for nid, t in outcomes.items()
    ]
    if recs:
        _write("test", args.name, recs, prov, args)
    counts = {}
    for t in outcomes.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    print(f"tests: {counts or 'none ran'}" + (f"; hung: {hung}" if hung else ""), flush=True)
    bad = counts.get("failed", 0) + counts.get("error", 0) + len(hung)
    return 1 if bad or rc not in (0, 5) or not outcomes else 0


def table(args) -> int:
    """The short table of the results files under the given folders."""
    from ik_fast import records

    recs = []
    paths = [
        os.path.join(d, f) for folder in args.folders for d, _, fs in os.walk(folder) for f in fs if f.endswith(".json")
    ]
    for path in sorted(paths, key=os.path.getmtime):  # in the order the run wrote them
        try:
            recs += records.load(path)
        except (ValueError, OSError) as exc:
            print(f"{path}: {exc}")
    if not recs:
        print("no results files")
        return 1
    r0 = recs[0]
    print(
        f"{r0['device']['name']} | commit {r0['commit'][:12]}{' (dirty)' if r0['dirty'] else ''} | "
        + ", ".join(f"{k} {v}" for k, v in r0["stack"].items() if v)
    )
    for r in recs:
        if r["kind"] == "compile" and r["metric"] == "build_time":
            how = r["extra"].get("how")
            print(
                f"native build: {r['value']:.1f} s ({how}; CUDA part: {r['extra'].get('cuda_part')})"
                if r["value"] is not None
                else f"native build FAILED: {r['error'][:300]}"
            )
    tests_ = [r for r in recs if r["kind"] == "test"]
    if tests_:
        counts = {}
        for r in tests_:
            counts[r["extra"]["outcome"]] = counts.get(r["extra"]["outcome"], 0) + 1
        print("tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        for r in tests_:
            if r["extra"]["outcome"] in ("failed", "error", "hung"):
                msg = [ln for ln in r["extra"]["message"].splitlines() if ln.strip()]
                print(f"  {r['extra']['outcome'].upper()} {r['problem']}: {msg[-1][:160] if msg else ''}")
    pre = [r for r in recs if r["kind"] == "compile" and r["metric"] == "first_step_time"]
    if pre:
        ok = [r for r in pre if r["value"] is not None]
        failed = [
            f"{r['problem']} {r['precision']} {r['mode']}: {r['error'][:100]}"
            for r in pre
            if r["value"] is None and not r["error"].startswith("skipped")
        ]
        print(
            f"precompile: {len(ok)} of {len(pre)} steps, {sum(r['value'] for r in ok):.0f} s"
            + (
                f"; failed: {'; '.join(failed[:2])}" + (f" (and {len(failed) - 2} more)" if len(failed) > 2 else "")
                if failed
                else ""
            )
        )
    steps = [r for r in recs if r["kind"] == "timing" and r["metric"] == "step_time"]
    if steps:
        _timing_table(steps, recs)
    return 0


def _short(error: str) -> str:
    for key, word in (("out of memory", "oom"), ("stopped", "stopped"), ("skipped", "skipped"), ("timeout", "timeout")):
        if error.startswith(key) or error.startswith(f"{key} "):
            return word
    return "error"


def _timing_table(steps, recs) -> None:
    """One row per problem, precision and mode; one column per provider: the step time (ms), or why there is none."""
    providers = list(dict.fromkeys(r["provider"] for r in steps))
    rows = {}
    for r in steps:
        rows.setdefault((r["problem"], r["precision"], r["mode"]), {})[r["provider"]] = r
    print("training step time (ms) per provider, or why there is none:")
    print(f"| problem | precision | mode | edges | {' | '.join(providers)} |")
    print("|---|---|---|---|" + "---|" * len(providers))
    errors = {}
    for (problem, prec, mode), by in rows.items():
        edges = next((r["extra"].get("edges") for r in by.values() if r["extra"].get("edges")), None)
        cells = []
        for p in providers:
            r = by.get(p)
            if r is None:
                cells.append("")
            elif r["value"] is None:
                cells.append(_short(r["error"]))
                if cells[-1] == "error":
                    errors.setdefault(r["error"][:160], []).append(f"{problem}/{prec}/{p}")
            else:
                cells.append(f"{r['value'] * 1e3:.2f}")
        print(f"| {problem} | {prec} | {mode} | {'' if edges is None else f'{edges:,}'} | {' | '.join(cells)} |")
    for msg, where in list(errors.items())[:5]:
        print(f"  error in {len(where)} case(s), e.g. {where[0]}: {msg}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_run.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)

    def common(p, results=True):
        p.add_argument("--device", default="cuda", help="the device measured: cuda, or cpu in the rehearsal")
        if results:
            p.add_argument(
                "--results",
                default=None,
                help="the results root (default: the checkout's benchmarks/results, or $IK_FAST_RESULTS_DIR)",
            )
            p.add_argument("--copy-to", default=None, help="also write every results file under this folder")

    common(sub.add_parser("versions", help="print the device and the stack's versions"), results=False)
    common(sub.add_parser("build", help="load or build the native extension, timed; one compile record"))
    t = sub.add_parser("tests", help="pytest with time limits; test records and junit XML")
    common(t)
    t.add_argument("--per-test", type=float, required=True, help="seconds per test (IK_FAST_TEST_TIMEOUT)")
    t.add_argument(
        "--deadline", type=float, required=True, help="Unix time after which no test starts (IK_FAST_TEST_DEADLINE)"
    )
    t.add_argument("--out-dir", required=True, help="folder of the junit XML and progress files")
    t.add_argument("--name", default="gpu-tests", help="results file name (<date>-NAME.json)")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER, help="pytest's arguments, after --")
    tb = sub.add_parser("table", help="the short table of the results files under FOLDERS")
    tb.add_argument("folders", nargs="+", help="folders searched for results files")
    args = ap.parse_args(argv)
    if getattr(args, "results", None) is None and args.step != "table":
        args.results = os.environ.get("IK_FAST_RESULTS_DIR") or None
    if args.step == "tests":
        args.pytest_args = [a for a in args.pytest_args if a != "--"] or ["tests", "-m", "gpu"]
        if args.per_test <= 0:
            ap.error(f"--per-test must be positive, got {args.per_test}")
    return {"versions": versions, "build": build, "tests": tests, "table": table}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
