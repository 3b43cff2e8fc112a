"""One schema for every measurement record (timing, compile, work, precision, training, equivariance, tests).

A results file is JSON: ``{"schema": SCHEMA, "records": [record, ...]}``. Every record is self-contained, so a figure
quoted anywhere names the commit, the device and the stack that measured it:

============  ==================================================================================================
field         meaning
============  ==================================================================================================
kind          one of :data:`KINDS`
commit        the measured commit (40 hex digits), or ``"unknown"`` outside a git checkout
dirty         whether the working tree differed from ``commit`` (tracked files)
date          when it was measured, ISO 8601 in UTC
device        ``{"type": "cpu" | "cuda", "name": ...}`` (the CPU model, or the GPU's name)
stack         versions: ``{"python", "torch", "triton", "escnn", "numpy", "cuda"}`` (None where absent)
problem       the problem measured (:mod:`ik_fast.tools.problems` names, a test file, a kernel, ...)
provider      who computed it: a backend (``reference``, ``torch``, ``native``, ``triton``), ``escnn``, ``nvcc``, ...
mode          ``train``, ``eval``, ``inference``, ... or ``""`` where it does not apply
precision     ``ieee``, ``tf32``, ``tf32x3``, ``bf16``, ``float64``, ... or ``""``
metric        what ``value`` is, e.g. ``step_time``, ``peak_memory``, ``macs_per_edge``, ``registers``
value         a number, or None when the measurement failed (then ``error`` says why)
unit          ``s``, ``MB``, ``count``, ``1`` (a ratio), ...
spread        None or ``{"p20": ..., "p80": ..., "n": samples}``
extra         free-form details (edges, the command, a forward/backward split, ...)
error         optional: why there is no value
============  ==================================================================================================

:func:`provenance` gives the fields that describe the run (commit, dirty, date, device, stack); :func:`record` makes
one record; :func:`write` writes a file (atomically, so a run stopped midway leaves the last complete file);
:func:`validate` checks a file's content and names the first offending field.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from typing import Dict, Iterable, List, Optional

__all__ = ["SCHEMA", "KINDS", "provenance", "record", "write", "load", "validate", "device_slug"]

SCHEMA = "ik_fast-results/1"
KINDS = ("timing", "compile", "work", "precision", "training", "equivariance", "test", "sectors", "model")
_FIELDS = (
    "kind",
    "commit",
    "dirty",
    "date",
    "device",
    "stack",
    "problem",
    "provider",
    "mode",
    "precision",
    "metric",
    "value",
    "unit",
    "spread",
    "extra",
)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    if module not in sys.modules:
        try:
            __import__(module)
        except Exception:
            return None
    return getattr(sys.modules[module], "__version__", None)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str = "cpu") -> Dict[str, object]:
    """commit, dirty, date, device and stack of a measurement on ``device`` made now, from this checkout.

    The commit is ``$IK_FAST_COMMIT`` when set (a copy of the tree without its ``.git``, e.g. on a lent GPU machine),
    else read with git; ``dirty`` likewise from ``$IK_FAST_DIRTY`` (``0``/``1``)."""
    import torch

    commit = os.environ.get("IK_FAST_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    if "IK_FAST_DIRTY" in os.environ:
        dirty = os.environ["IK_FAST_DIRTY"] not in ("", "0")
    else:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else True
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    stack = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "escnn": _version("escnn"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
    }
    return {
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": dev.type, "name": name},
        "stack": stack,
    }


def device_slug(prov: Dict[str, object]) -> str:
    """A folder name for the device of a provenance, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-7b13``."""
    import re

    dev = prov["device"]
    name = re.sub(r"\(.*?\)", "", dev["name"]).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48]
    return slug if dev["type"] == "cuda" else f"cpu-{slug}".replace("cpu-cpu", "cpu")


def record(
    kind: str,
    problem: str,
    provider: str,
    metric: str,
    value,
    unit: str,
    *,
    mode: str = "",
    precision: str = "",
    spread: Optional[Dict[str, float]] = None,
    extra: Optional[Dict] = None,
    error: Optional[str] = None,
    prov: Optional[Dict[str, object]] = None,
    device: str = "cpu",
) -> Dict:
    """One record; ``prov`` (from :func:`provenance`, computed once per run) else the provenance now."""
    prov = prov or provenance(device)
    rec = {
        "kind": kind,
        **{k: prov[k] for k in ("commit", "dirty", "date", "device", "stack")},
        "problem": problem,
        "provider": provider,
        "mode": mode,
        "precision": precision,
        "metric": metric,
        "value": None if value is None else float(value),
        "unit": unit,
        "spread": spread,
        "extra": extra or {},
    }
    if error is not None:
        rec["error"] = str(error)
    validate_record(rec)
    return rec


def write(path: str, records: Iterable[Dict]) -> str:
    """Write ``records`` to ``path`` (folders created; atomic: a temporary file renamed over it). Returns ``path``."""
    records = list(records)
    for i, r in enumerate(records):
        validate_record(r, f"records[{i}]")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"schema": SCHEMA, "records": records}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load(path: str) -> List[Dict]:
    """The records of a results file (validated)."""
    with open(path) as f:
        obj = json.load(f)
    validate(obj, path)
    return obj["records"]


def validate_record(rec: Dict, where: str = "record") -> None:
    """Raise ValueError naming the first field of ``rec`` that does not follow the schema."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where} must be an object, got {type(rec).__name__}")
    missing = [k for k in _FIELDS if k not in rec]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing}")
    extra = set(rec) - set(_FIELDS) - {"error"}
    if extra:
        raise ValueError(f"{where} has unknown field(s) {sorted(extra)} (free-form details go under 'extra')")
    checks = [
        ("kind", rec["kind"] in KINDS, f"one of {KINDS}"),
        (
            "commit",
            isinstance(rec["commit"], str)
            and (
                rec["commit"] == "unknown"
                or (len(rec["commit"]) == 40 and all(c in "0123456789abcdef" for c in rec["commit"]))
            ),
            "40 hex digits or 'unknown'",
        ),
        ("dirty", isinstance(rec["dirty"], bool), "a boolean"),
        ("date", isinstance(rec["date"], str) and _is_date(rec["date"]), "an ISO 8601 date"),
        (
            "device",
            isinstance(rec["device"], dict)
            and rec["device"].get("type") in ("cpu", "cuda")
            and isinstance(rec["device"].get("name"), str)
            and rec["device"]["name"] != "",
            "{'type': 'cpu'|'cuda', 'name': str}",
        ),
        (
            "stack",
            isinstance(rec["stack"], dict)
            and isinstance(rec["stack"].get("torch"), str)
            and isinstance(rec["stack"].get("python"), str),
            "an object with at least 'python' and 'torch'",
        ),
        ("problem", isinstance(rec["problem"], str) and rec["problem"] != "", "a non-empty string"),
        ("provider", isinstance(rec["provider"], str) and rec["provider"] != "", "a non-empty string"),
        ("mode", isinstance(rec["mode"], str), "a string"),
        ("precision", isinstance(rec["precision"], str), "a string"),
        ("metric", isinstance(rec["metric"], str) and rec["metric"] != "", "a non-empty string"),
        (
            "value",
            rec["value"] is None or (isinstance(rec["value"], (int, float)) and not isinstance(rec["value"], bool)),
            "a number or null",
        ),
        ("unit", isinstance(rec["unit"], str), "a string"),
        (
            "spread",
            rec["spread"] is None
            or (isinstance(rec["spread"], dict) and all(isinstance(v, (int, float)) for v in rec["spread"].values())),
            "null or an object of numbers",
        ),
        ("extra", isinstance(rec["extra"], dict), "an object"),
    ]
    for field, ok, want in checks:
        if not ok:
            raise ValueError(f"{where}.{field} must be {want}, got {rec[field]!r}")
    if rec["value"] is None and not rec.get("error"):
        raise ValueError(f"{where} has no value and no 'error' saying why")


def validate(obj: Dict, where: str = "results") -> None:
    """Raise ValueError naming what in a results file's content does not follow the schema."""
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        got = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: 'schema' must be {SCHEMA!r}, got {got!r}")
    if not isinstance(obj.get("records"), list):
        raise ValueError(f"{where}: 'records' must be a list")
    for i, r in enumerate(obj["records"]):
        validate_record(r, f"{where}: records[{i}]")


def _is_date(s: str) -> bool:
    try:
        _dt.datetime.fromisoformat(s)
    except ValueError:
        return False
    return True
