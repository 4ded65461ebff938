"""Building and loading the C++ decode kernels (csrc/), predictably, one build per instruction set.

* Three instruction sets, chosen when the process first loads the kernels: `avx512` (AVX-512 F/BW/VL/DQ,
  16-lane vectors), `avx2` (AVX2 + FMA + F16C, 8 lanes) and `portable` (no -m flags at all: the compiler's
  baseline, SSE2 on x86 and NEON on ARM). Once a model is accelerated, the build measured fastest for its
  weight format on this CPU is taken (nanoseek.infer.fast.choice; wider vectors are not faster everywhere);
  before that, the best one the CPU runs by its flags (/proc/cpuinfo, else
  `torch.backends.cpu.get_cpu_capability()`); `NANOSEEK_KERNEL_ISA=portable|avx2|avx512`
  forces one (tests force `portable` to check that path against torch on any machine). A forced ISA the
  CPU cannot run is refused with a one-line message, and the torch paths are used.
* One build per build key: the SHA-256 of the sources, the torch and Python versions, the machine, the
  instruction set and its flags, and the compiler (`$CXX`, else `c++`). The key names the extension, so
  two checkouts, two torch versions, two ISAs or two compilers each get their own entry and never rebuild
  one another's. Builds live under `$TORCH_EXTENSIONS_DIR/nanoseek/` (default `~/.cache/torch_extensions`).
* A message before building (a minute or so, once per build key), and one when it is done.
* A failed build is recorded beside the builds (`<name>.failed.json`, with the compiler's output);
  later processes say so once and use the torch paths instead of compiling again. `nanoseek
  build-kernels` (or deleting that file) retries.
* OpenMP if the compiler has it (`-fopenmp`, or Apple clang's `-Xpreprocessor -fopenmp -lomp`); without
  it the kernels build single-threaded, with a warning.
* `NANOSEEK_KERNELS=0` turns them off; `nanoseek.infer.fast.accelerate` never loads them for a model
  on a GPU.

`nanoseek build-kernels` builds ahead of time and reports the key, the directory, the OpenMP mode and the
instruction sets; `--isa avx512` on a CPU without AVX-512 compiles that build (to check the compiler takes
it) without loading it.
"""

from __future__ import annotations

import contextlib
import functools
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
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("decode_kernels.cpp", "gemv.cpp")  # compiled, from csrc/; gemv.h is included by both
HEADERS = ("gemv.h", "gemv_int8act.h", "router.h")
CFLAGS = ["-O3", "-ffp-contract=fast"]
# instruction set -> compiler flags, best first. The portable build has no -m flag at all.
ISA_FLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DNANOSEEK_ISA_AVX512", "-DNANOSEEK_VEC_BYTES=64"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DNANOSEEK_ISA_AVX2", "-DNANOSEEK_VEC_BYTES=32"],
    "portable": ["-DNANOSEEK_VEC_BYTES=32"],
}
# the /proc/cpuinfo flags each x86 build needs
ISA_CPU_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
                 "avx2": ("avx2", "fma", "f16c"), "portable": ()}
ISA_ENV = "NANOSEEK_KERNEL_ISA"
LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"


def enabled() -> bool:
    return os.environ.get("NANOSEEK_KERNELS", "1") != "0"


def build_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return Path(base) / "nanoseek"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo (Linux), read once per process; empty where that file is absent."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(*names: str) -> str | None:  # the first line starting with one of the names, after its ':'
    return next((ln.split(":", 1)[1].strip() for ln in _cpuinfo().splitlines() if ln.startswith(names)), None)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), or an empty set where that file is absent. Read once
    per process: every kernel call asks which instruction set to use."""
    return frozenset((_cpuinfo_field("flags", "Features") or "").split())


@functools.cache
def cpu_identity() -> str:
    """The CPU's model name and flags (elsewhere than Linux: platform's description): what a measured
    choice of build belongs to."""
    model = _cpuinfo_field("model name", "Model", "CPU part") or f"{platform.machine()} {platform.processor()}"
    return f"{model} | {' '.join(sorted(cpu_flags()))}"


@functools.cache
def _runnable_isas() -> tuple[str, ...]:
    return tuple(_detect_isas())


def runnable_isas() -> list[str]:
    """The instruction sets this CPU runs, best first (`portable` always); detected once per process."""
    return list(_runnable_isas())


def _detect_isas() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["portable"]
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo (macOS, Windows): ask torch what its own kernels dispatch to
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except AttributeError:
            cap = ""
        names = {"AVX512": ["avx512", "avx2"], "AVX2": ["avx2"]}.get(cap, [])
        return names + ["portable"]
    return [isa for isa, need in ISA_CPU_FLAGS.items() if all(f in flags for f in need)]


class ISAError(ValueError):
    """NANOSEEK_KERNEL_ISA names an unknown instruction set or one this CPU cannot run."""


def selected_isa() -> str:
    """NANOSEEK_KERNEL_ISA if set (checked), else the best instruction set this CPU runs."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    runnable = runnable_isas()
    if not forced:
        return runnable[0]
    if forced not in ISA_FLAGS:
        raise ISAError(f"{ISA_ENV}={forced!r}: choose one of {', '.join(ISA_FLAGS)}")
    if forced not in runnable:
        raise ISAError(f"{ISA_ENV}={forced}: this CPU cannot run it (it runs {', '.join(runnable)})")
    return forced


def isa_flags(isa: str | None = None) -> tuple[str, list[str]]:
    """(instruction set, its compiler flags); the selected one by default."""
    isa = isa or selected_isa()
    return isa, list(ISA_FLAGS[isa])


def sources_sha256(csrc: Path = CSRC) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (csrc / name).read_bytes())
    return h.hexdigest()


def build_key(isa: str | None = None, csrc: Path = CSRC) -> dict:
    """Everything a build of `isa` (default: the selected one) depends on; `name` (the extension's name)
    is a hash of the rest."""
    isa, isa_cflags = isa_flags(isa)
    key = {"source_sha256": sources_sha256(csrc), "torch": torch.__version__,
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
    """One instruction set's extension in this process: imported from a previous build, built now, or
    known to be missing."""

    def __init__(self, isa: str):
        self.isa = isa
        self.lock = threading.Lock()
        self.module = None
        self.tried = False
        self.state = "not loaded"  # -> loaded | failed | disabled
        self.reason = ""
        self.path: Path | None = None
        self.prefetch: dict = {}  # nanoseek.infer.fast.prefetch.configure's record, once loaded

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
            key = build_key(self.isa)
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
            if self.module is not None:
                from .prefetch import configure  # the prefetch distance this machine's memory wants

                self.prefetch = configure(self.module, build_root(), key["name"])
                self.module.set_int8_activations(KERNELS.int8_activations_on())
        return self.module


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One build per directory at a time, under an flock the kernel releases when its holder dies.

    torch's own lock is a plain file (FileBaton) that a killed build leaves behind, after which every later
    process waits for it forever. Every nanoseek build runs under this flock, so a baton found while we
    hold it was left by a dead process, and is removed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's baton alone
        yield
        return
    with open(directory / "nanoseek_build.flock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                print(f"nanoseek: removing a stale build lock left by a killed build ({stale})", file=sys.stderr,
                      flush=True)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    for name in SOURCES + HEADERS:
        src, copy = CSRC / name, directory / name
        if not copy.is_file() or copy.read_bytes() != src.read_bytes():
            shutil.copyfile(src, copy)
    mode, omp_cflags, omp_ldflags = openmp_flags(key["compiler"])
    if mode == "none":
        print(f"nanoseek: {key['compiler']} has no OpenMP: the decode kernels run single-threaded (install "
              "libgomp / libomp and run `nanoseek build-kernels --force` to change that)", file=sys.stderr, flush=True)
    with _build_lock(directory):
        module = build(name=key["name"], sources=[str(directory / name) for name in SOURCES],
                       extra_cflags=key["cflags"] + omp_cflags, extra_ldflags=omp_ldflags,
                       build_directory=str(directory), verbose=False)
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


class _PerISA:
    """The process's extensions, one per instruction set; `load()` is the selected one's (the hot path).

    Selected: NANOSEEK_KERNEL_ISA if set; else, once a model's weight format is known (`prefer_format`,
    which nanoseek.infer.fast.accelerate calls), the build measured fastest for that format here
    (nanoseek.infer.fast.choice); before that, the best build by CPU flags."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_isa: dict[str, _Kernels] = {}
        self.isa_error = ""  # a refused NANOSEEK_KERNEL_ISA, said once
        # ((NANOSEEK_KERNEL_ISA as read, the format), its kernels, the measured choice behind them or None):
        # what the last call selected
        self.last: tuple[tuple, _Kernels, dict | None] | None = None
        self.format: str | None = None  # the weight format of the model last accelerated
        self.int8_activations: bool | None = None  # set_int8_activations' state (None: from the environment)
        self.choices: dict[tuple[str, int], dict] = {}  # (format key, threads) -> nanoseek.infer.fast.choice's record

    def format_key(self) -> str | None:
        if self.format is None:
            return None
        from .choice import format_key

        return format_key(self.format, self.int8_activations_on())

    def int8_activations_on(self) -> bool:
        """set_int8_activations' state, else NANOSEEK_INT8_ACTIVATIONS (what each build takes when it loads)."""
        return self.int8_activations if self.int8_activations is not None else _int8_activations_env()

    def prefer_format(self, fmt: str | None) -> None:
        self.format = fmt
        self.last = None

    def set_int8_activations(self, on: bool) -> None:
        """Every build's int8-activation switch, now and at later loads (each extension holds its own)."""
        self.int8_activations = bool(on)
        for k in list(self.by_isa.values()):
            if k.module is not None:
                k.module.set_int8_activations(bool(on))
        self.last = None

    def get(self, isa: str | None = None) -> _Kernels | None:
        if isa is None:
            forced = os.environ.get(ISA_ENV)
            if self.last is not None and self.last[0] == (forced, self.format):  # the hot path: as last call
                return self.last[1]
            record = None
            try:
                if forced and forced.strip():
                    isa = selected_isa()
                else:
                    isa, record = self.measured_isa()
            except ISAError as e:
                if not self.isa_error:
                    self.isa_error = str(e)
                    print(f"nanoseek: {e}; using the torch paths", file=sys.stderr, flush=True)
                return None
            k = self._kernels(isa)
            self.last = ((forced, self.format), k, record)
            return k
        return self._kernels(isa)

    def candidates(self) -> list[str]:
        """The builds a measured choice is between: the vector ones this CPU runs (portable only where
        there is none)."""
        vector = [isa for isa in runnable_isas() if isa != "portable"]
        return vector or ["portable"]

    def measured_isa(self) -> tuple[str, dict | None]:
        """(build, record): the fastest for the preferred format at these threads (measured now if this
        machine has no record), or (the best by flags, None) where there is nothing to choose."""
        key = self.format_key()
        first = runnable_isas()[0]
        if key is None or not enabled() or len(self.candidates()) < 2:
            return first, None
        threads = torch.get_num_threads()
        record = self.choices.get((key, threads))
        if record is None:
            modules = {isa: m for isa in self.candidates() if (m := self._kernels(isa).load()) is not None}
            if len(modules) < 2:
                return next(iter(modules), first), None
            from .choice import choose

            record = choose(key, modules, build_root(), cpu_identity(), threads)
            self.choices[(key, threads)] = record
        return record["isa"], record

    def _kernels(self, isa: str) -> _Kernels:
        k = self.by_isa.get(isa)
        if k is None:
            with self.lock:
                k = self.by_isa.setdefault(isa, _Kernels(isa))
        return k

    def load(self, force: bool = False, isa: str | None = None):
        k = self.get(isa)
        return None if k is None else k.load(force)


KERNELS = _PerISA()


INT8_ACTIVATIONS_ENV = "NANOSEEK_INT8_ACTIVATIONS"  # 1: int8 / int4 weights take int8 activations


_said_bad_env: set[str] = set()  # values of NANOSEEK_INT8_ACTIVATIONS already refused


def _int8_activations_env() -> bool:
    """NANOSEEK_INT8_ACTIVATIONS=1: int8 activations on (0 or unset: off; anything else said once, and off)."""
    value = os.environ.get(INT8_ACTIVATIONS_ENV, "").strip()
    if value and value not in ("1", "0") and value not in _said_bad_env:
        _said_bad_env.add(value)
        print(f"nanoseek: {INT8_ACTIVATIONS_ENV}={value!r} ignored (1 = on, 0 = off); int8 activations stay off",
              file=sys.stderr, flush=True)
    return value == "1"


def load(force: bool = False, isa: str | None = None):
    """The compiled extension of `isa` (default: the selected one), building it on the first call of this
    process if no build exists; None when it is disabled, failed before (a recorded failure is not retried
    unless force), fails now, or the forced ISA is refused."""
    return KERNELS.load(force, isa)


def status(isa: str | None = None) -> dict:
    """Where this process stands: state (not loaded | loaded | failed | disabled), reason, build path, ISA."""
    k = KERNELS.get(isa)
    if k is None:
        return {"state": "failed", "reason": KERNELS.isa_error, "path": None, "isa": None}
    return {"state": k.state if enabled() else "disabled", "reason": k.reason,
            "path": str(k.path) if k.path else None, "isa": k.isa, "prefetch": k.prefetch,
            "int8_activations": None if k.module is None else {"on": k.module.int8_activations(),
                                                                "kernel": k.module.int8_activation_kernel()},
            "chosen_by": chosen_by() if isa is None else {"by": "asked for"}}


def chosen_by() -> dict:
    """Why the selected build is the one: forced by NANOSEEK_KERNEL_ISA, the best by CPU flags (no model
    format named yet, or one vector build only), or measured for a weight format (with the record)."""
    if os.environ.get(ISA_ENV, "").strip():
        return {"by": ISA_ENV}
    KERNELS.get()  # the selection as the next kernel call makes it
    key, record = KERNELS.format_key(), KERNELS.last[2] if KERNELS.last else None
    if record is None:
        return {"by": "cpu flags", "format": key}
    return {"by": "measured", "format": key, **record}


def prefer_format(fmt: str | None) -> None:
    """The weight format the decode kernels will mostly stream (fp32 | bf16 | int8 | int4; None: no
    preference): the selected build becomes the one measured fastest for it on this CPU (measured at the
    next kernel call if this machine has no record, building the other instruction set's extension if
    needed). nanoseek.infer.fast.accelerate calls it with the model's format."""
    from .choice import WEIGHT_FORMATS
    if fmt is not None and fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose {', '.join(WEIGHT_FORMATS)}")
    KERNELS.prefer_format(fmt)
