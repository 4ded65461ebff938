"""`nanoseek build-kernels`: build the C++ decode kernels ahead of time and say where, or compile a build
this CPU cannot run to check that the compiler takes it (nanoseek.infer.fast.build does the building)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .build import (CFLAGS, KERNELS, CSRC, INT8_ACTIVATIONS_ENV, ISA_FLAGS, ISA_ENV, SOURCES, ISAError, _last_error_line,
                    build_key, build_root, compiler, enabled, load, runnable_isas, selected_isa, status)


def compile_only(isa: str, out_dir: Path) -> list[Path]:
    """Compile `isa`'s build to object files in out_dir without loading it: checks that this compiler
    takes a build this CPU cannot run (AVX-512 on an AVX2 machine). Raises CalledProcessError on failure."""
    import sysconfig

    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    flags = ["-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=nanoseek_compile_check", *CFLAGS, *ISA_FLAGS[isa]]
    out_dir.mkdir(parents=True, exist_ok=True)
    objects = []
    for name in SOURCES:
        obj = out_dir / (Path(name).stem + f".{isa}.o")
        subprocess.run([compiler(), *flags, *includes, "-c", str(CSRC / name), "-o", str(obj)], check=True,
                       capture_output=True, text=True)
        objects.append(obj)
    return objects


def compiler_takes(isa: str) -> bool:
    """Whether the compiler accepts this ISA's -m flags (a one-line probe, not the whole build)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        try:
            r = subprocess.run([compiler(), *ISA_FLAGS[isa], str(src), "-o", str(Path(tmp) / "probe")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return r.returncode == 0


# ----------------------------------------------------------------------------- `nanoseek build-kernels`
def add_arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even if a build for this key exists")
    p.add_argument("--isa", choices=list(ISA_FLAGS), default=None,
                   help=f"the instruction set to build (default: ${ISA_ENV}, else the best this CPU runs); one "
                        "this CPU cannot run is compiled to check the compiler, not loaded")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    runnable = runnable_isas()
    try:
        isa = args.isa or selected_isa()
    except ISAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isa not in runnable:
        return _compile_check(isa, runnable, args.json)
    key = build_key(isa)
    directory = build_root() / key["name"]
    if args.force and directory.is_dir():
        shutil.rmtree(directory)
    if args.force:  # and measure the prefetch distance again
        from .prefetch import record_path

        record_path(build_root(), key["name"]).unlink(missing_ok=True)
    module = load(force=True, isa=isa)
    # the other vector builds too, where a measured choice per weight format picks between them
    also = [] if args.isa else [other for other in KERNELS.candidates()
                                 if other != isa and load(force=args.force, isa=other) is not None]
    info_file = directory / "nanoseek_build.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else dict(key)
    st = status(isa)
    result = {**info, "ok": module is not None, "directory": str(directory), "library": st["path"],
              "reason": st["reason"], "disabled_at_run_time": not enabled(), "runnable_isas": runnable,
              "prefetch": st["prefetch"], "also_built": also}
    if args.json:
        print(json.dumps(result, indent=2))
    elif module is None:
        print(f"nanoseek build-kernels: the decode kernels did not build: {result['reason']}", file=sys.stderr)
    else:
        print(f"decode kernels: {result['library']}\n  key: torch {key['torch']}, {key['python']}, "
              f"{key['machine']} {key['isa']}, {key['compiler']}, source {key['source_sha256'][:12]}\n"
              f"  OpenMP: {info.get('openmp', 'unknown (built by an older nanoseek)')}\n"
              f"  this CPU runs: {', '.join(runnable)}\n"
              f"  bf16 / int8 prefetch: {st['prefetch'].get('bytes')} bytes ahead ({st['prefetch'].get('source')}; "
              f"1-2 row GB/s by distance: {st['prefetch'].get('read_gbs', 'not measured')})\n"
              f"  int8 activations: {st['int8_activations']['kernel']} loop, "
              f"{'on' if st['int8_activations']['on'] else 'off'} ({INT8_ACTIVATIONS_ENV}=1 or --int8-activations)")
        if also:
            print(f"  also built: {', '.join(also)} (a model's weight format takes the build measured fastest for it; "
                  f"{ISA_ENV} forces one)")
        if not enabled():
            print("  note: NANOSEEK_KERNELS=0 is set, so they stay off at run time")
    return 0 if module is not None else 1


def _compile_check(isa: str, runnable: list[str], as_json: bool) -> int:
    """`build-kernels --isa X` for an X this CPU cannot run: compile it (not load it) and say so."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            compile_only(isa, Path(tmp))
            ok, reason = True, ""
        except subprocess.CalledProcessError as e:
            ok, reason = False, _last_error_line(e.stderr or "") or "the compiler failed"
    result = {"isa": isa, "ok": ok, "compiled_only": True, "reason": reason, "runnable_isas": runnable}
    if as_json:
        print(json.dumps(result, indent=2))
    elif ok:
        print(f"the {isa} build compiles with {compiler()}; this CPU cannot run it (it runs {', '.join(runnable)}), "
              "so it was not loaded")
    else:
        print(f"error: the {isa} build does not compile with {compiler()}: {reason}", file=sys.stderr)
    return 0 if ok else 1
