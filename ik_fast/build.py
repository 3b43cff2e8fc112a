"""Build the native extension ahead of time: ``python -m ik_fast.build``.

Does what the first use of the ``"native"`` backend would do (:mod:`ik_fast._native`): imports a current prebuilt
``ik_fast._C`` (built by ``setup.py`` at install), else compiles ``csrc/`` into the first-use cache
(``$IK_FAST_CACHE``, default ``~/.cache/ik_fast``) or finds it there, and prints what it built, where, in how long, and
whether the CUDA part is in it and why. The same environment variables apply (``IK_FAST_BUILD_CUDA``,
``IK_FAST_CPU_FLAGS``, ``CXX``, ``IK_FAST_CACHE``; docs/getting-started.md, "The native extension"). Exit status 0
when the CPU part loads, 1 with the build's own error lines when it does not.

Run it outside a source checkout to build for the installed package (``python -m`` puts the current folder first on
the path, so inside a checkout it builds the checkout's ``csrc/``; ``python -P -m ik_fast.build`` does not).
"""

from __future__ import annotations

import argparse
import sys

_DESCRIPTION = """Build the native extension now instead of at its first use: import a current prebuilt ik_fast._C, else
compile csrc/ into the first-use cache ($IK_FAST_CACHE, default ~/.cache/ik_fast) or find it there; print what was
built, where, in how long, and whether the CUDA part is in it and why. IK_FAST_BUILD_CUDA=1 requires the CUDA part
(fails at once with the reason where it cannot be built), IK_FAST_BUILD_CUDA=0 skips it; IK_FAST_CPU_FLAGS and CXX
as for every build (docs/getting-started.md, "The native extension"). Exit status 1, with the build's own error
lines, when the CPU part cannot be built or loaded. Run it outside a source checkout, or as python -P -m
ik_fast.build, to build for the installed package rather than for the checkout's ik_fast/ in the current folder."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ik_fast.build", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rebuild", action="store_true", help="compile again even when the first-use cache holds this configuration"
    )
    args = ap.parse_args(argv)

    from ik_fast import _build, _native
    from ik_fast.backends import native as _registers_the_op_schemas  # noqa: F401  (the module's kernels need them)

    try:
        mod = _native.load(rebuild=args.rebuild)
    except Exception as e:  # a failed build: its reason, with the compiler's or linker's own lines
        print(f"ik_fast.build: the native extension is not available:\n{e}", file=sys.stderr)
        return 1
    info = _native.info()
    if _build._env_flag("IK_FAST_BUILD_CUDA") and not mod.cuda_built():  # only a prebuilt module gets here
        try:
            _build.cuda_decision(_build.source_root())
            why = "the CUDA part can be built here: reinstall ik_fast (setup.py builds it) or remove that module"
        except _build.CudaBuildError as e:
            why = str(e)
        print(
            f"ik_fast.build: IK_FAST_BUILD_CUDA=1, but the extension in use ({info.get('how')}, {info.get('path')}) "
            f"has no CUDA part; {why}",
            file=sys.stderr,
        )
        return 1
    parts = "CPU and CUDA parts" if mod.cuda_built() else "CPU part only"
    how = {
        "prebuilt": "prebuilt by setup.py at install (current with the sources)",
        "cached": f"found in the first-use cache (compiled earlier in {info.get('seconds')} s)",
        "compiled": f"compiled now in {info.get('seconds')} s",
    }.get(info.get("how"), info.get("how"))
    print(f"ik_fast.build: native extension, {parts}: {info.get('path')}")
    print(f"  {how}")
    if args.rebuild and info.get("how") == "prebuilt":
        print("  (--rebuild applies to the first-use cache; a prebuilt ik_fast._C is rebuilt by reinstalling)")
    if info.get("cuda_reason"):
        print(f"  CUDA part {'built' if mod.cuda_built() else 'skipped'}: {info['cuda_reason']}")
    print(
        f"  OpenMP {'on' if mod.openmp() else 'off'}, CPU vector ISA {mod.cpu_capability()}, "
        f"{mod.num_threads()} threads"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
