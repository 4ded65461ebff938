"""Building and loading the C++ decode kernels (csrc/decode_kernels.cpp), predictably.

* One build per build key: the SHA-256 of the source, the torch and Python versions, the machine, the
  CPU instruction set compiled for and the compiler (`$CXX`, else `c++`). The key names the extension,
  so two checkouts, two torch versions or two compilers each get their own entry and never rebuild one
  another's. Builds live under `$TORCH_EXTENSIONS_DIR/nanoseek/` (default `~/.cache/torch_extensions`).
* A message before building (a minute or so, once per build key), and one when it is done.
* A failed build is recorded beside the builds (`<name>.failed.json`, with the compiler's output);
  later processes say so once and use the torch paths instead of compiling again. `nanoseek
  build-kernels` (or deleting that file) retries.
* OpenMP if the compiler has it (`-fopenmp`, or Apple clang's `-Xpreprocessor -fopenmp -lomp`); without
  it the kernels build single-threaded, with a warning.
* `NANOSEEK_KERNELS=0` turns them off; `nanoseek.infer.fast.accelerate` never loads them for a model
  on a GPU.

`nanoseek build-kernels` builds ahead of time and reports the key, the directory and the OpenMP mode.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_kernels.cpp"
CFLAGS = ["-O3", "-ffp-contract=fast"]
LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"


def enabled() -> bool:
    return os.environ.get("NANOSEEK_KERNELS", "1") != "0"


def build_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return Path(base) / "nanoseek"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def isa_flags() -> tuple[str, list[str]]:
    """AVX2 + FMA when this x86 CPU has them (the kernels' 8-lane vectors map to one register), else the
    compiler's baseline."""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            flags = []
        if "avx2" in flags and "fma" in flags:
            return "avx2", ["-mavx2", "-mfma"]
    return "base", []


def build_key(source: Path = SOURCE) -> dict:
    """Everything a build depends on; `name` (the extension's name) is a hash of the rest."""
    isa, isa_cflags = isa_flags()
    key = {"source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "torch": torch.__version__,
           "python": sys.implementation.cache_tag, "machine": platform.machine(), "isa": isa,
           "compiler": compiler(), "cflags": CFLAGS + isa_cflags}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": f"nanoseek_decode_{isa}_{digest}", **key}


def openmp_flags(cxx: str) -> tuple[str, list[str], list[str]]:
    """(mode, compile flags, link flags): the first OpenMP spelling this compiler accepts, else none."""
    candidates = [("-fopenmp", ["-fopenmp"], ["-fopenmp"])]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp driver flag; Homebrew's libomp provides the runtime
        for prefix in ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"):
            if Path(prefix).is_dir():
                candidates.append((f"libomp ({prefix})", ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"],
                                   [f"-L{prefix}/lib", "-lomp"]))
        candidates.append(("libomp", ["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
    program = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(program)
        for mode, cflags, ldflags in candidates:
            try:
                r = subprocess.run([cxx, *cflags, str(src), "-o", str(Path(tmp) / "probe"), *ldflags],
                                   capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                break  # no such compiler: the build itself will say so
            if r.returncode == 0:
                return mode, cflags, ldflags
    return "none", [], []


class _Kernels:
    """The extension of this process: imported from a previous build, built now, or known to be missing."""

    def __init__(self):
        self.lock = threading.Lock()
        self.module = None
        self.tried = False
        self.state = "not loaded"  # -> loaded | failed | disabled
        self.reason = ""
        self.path: Path | None = None

    def load(self, force: bool = False):
        if not force and self.tried:  # the hot path: every fast-path call asks
            return self.module
        if not force and not enabled():
            self.state = "disabled"
            return None
        with self.lock:
            if self.tried and not force:
                return self.module
            self.tried = True
            self.module = None
            key = build_key()
            directory = build_root() / key["name"]
            self.path = directory / (key["name"] + LIB_EXT)
            marker = build_root() / (key["name"] + ".failed.json")
            if force:
                marker.unlink(missing_ok=True)
            if marker.is_file() and not self.path.is_file():
                self.state = "failed"
                self.reason = _read_reason(marker)
                print(f"nanoseek: the C++ decode kernels failed to build earlier ({self.reason}); using the "
                      f"torch paths. Retry with `nanoseek build-kernels` (details: {marker})",
                      file=sys.stderr, flush=True)
                return None
            try:
                self.module = _import(key["name"], self.path) if self.path.is_file() else _build(key, directory)
                self.state, self.reason = "loaded", ""
            except Exception as e:  # noqa: BLE001 - any build failure means: use the torch paths
                output = _error_text(e)
                self.state, self.reason = "failed", _last_error_line(output) or type(e).__name__
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"reason": self.reason, "output": output[-20000:], "key": key,
                                              "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
                print(f"nanoseek: the C++ decode kernels did not build ({self.reason}); using the torch paths "
                      f"(the same values, slower decoding). Retry with `nanoseek build-kernels` once fixed "
                      f"(details: {marker})", file=sys.stderr, flush=True)
        return self.module


def _build(key: dict, directory: Path):
    from torch.utils.cpp_extension import load as build

    if shutil.which("ninja") is None:  # pip's ninja lives beside the interpreter of a venv
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    print(f"nanoseek: building the C++ decode kernels once, a minute or so (into {directory}) ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    # Compile a copy inside the build directory: the build's commands then do not depend on where this
    # checkout lives, and ninja has no reason to rebuild for another checkout of the same source.
    source = directory / SOURCE.name
    if not source.is_file() or source.read_bytes() != SOURCE.read_bytes():
        shutil.copyfile(SOURCE, source)
    mode, omp_cflags, omp_ldflags = openmp_flags(key["compiler"])
    if mode == "none":
        print(f"nanoseek: {key['compiler']} has no OpenMP: the decode kernels run single-threaded (install "
              "libgomp / libomp and run `nanoseek build-kernels --force` to change that)", file=sys.stderr, flush=True)
    module = build(name=key["name"], sources=[str(source)], extra_cflags=key["cflags"] + omp_cflags,
                   extra_ldflags=omp_ldflags, build_directory=str(directory), verbose=False)
    seconds = time.perf_counter() - t0
    (directory / "nanoseek_build.json").write_text(json.dumps(
        {**key, "openmp": mode, "openmp_flags": omp_cflags + omp_ldflags, "seconds": round(seconds, 1)}, indent=2) + "\n")
    print(f"nanoseek: decode kernels built in {seconds:.0f} s", file=sys.stderr, flush=True)
    return module


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error_text(e: BaseException) -> str:
    """The exception's message plus what the failing command printed (a compiler check keeps it there)."""
    text = str(e)
    for stream in (getattr(e, "output", None), getattr(e, "stderr", None)):
        if isinstance(stream, bytes):
            stream = stream.decode(errors="replace")
        if stream:
            text += "\n" + stream
    return text


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith(("FAILED:", "Error building"))]
    return (errors[0] if errors else lines[-1] if lines else "")[:300]


def _read_reason(marker: Path) -> str:
    try:
        return json.loads(marker.read_text()).get("reason", "unknown reason")
    except (OSError, ValueError):
        return "unknown reason"


KERNELS = _Kernels()


def load(force: bool = False):
    """The compiled extension, building it on the first call of this process if no build exists; None
    when it is disabled, failed before (a recorded failure is not retried unless force) or fails now."""
    return KERNELS.load(force)


def status() -> dict:
    """Where this process stands: state (not loaded | loaded | failed | disabled), reason, build path."""
    return {"state": KERNELS.state if enabled() else "disabled", "reason": KERNELS.reason,
            "path": str(KERNELS.path) if KERNELS.path else None}


# ----------------------------------------------------------------------------- `nanoseek build-kernels`
def add_arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even if a build for this key exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    key = build_key()
    directory = build_root() / key["name"]
    if args.force and directory.is_dir():
        shutil.rmtree(directory)
    module = load(force=True)
    info_file = directory / "nanoseek_build.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else dict(key)
    result = {**info, "ok": module is not None, "directory": str(directory), "library": status()["path"],
              "reason": status()["reason"], "disabled_at_run_time": not enabled()}
    if args.json:
        print(json.dumps(result, indent=2))
    elif module is None:
        print(f"nanoseek build-kernels: the decode kernels did not build: {result['reason']}", file=sys.stderr)
    else:
        print(f"decode kernels: {result['library']}\n  key: torch {key['torch']}, {key['python']}, "
              f"{key['machine']} {key['isa']}, {key['compiler']}, source {key['source_sha256'][:12]}\n"
              f"  OpenMP: {info.get('openmp', 'unknown (built by an older nanoseek)')}")
        if not enabled():
            print("  note: NANOSEEK_KERNELS=0 is set, so they stay off at run time")
    return 0 if module is not None else 1
