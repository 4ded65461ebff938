"""Strict mode (NANOSEEK_STRICT=1, what CI runs): a skip for a missing dependency is a failure, in a test, a
fixture, a mark, at module level or through pytest.importorskip; any other skip stays a skip.

Each case is a real pytest run in a subprocess with tests/conftest.py loaded as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CASES = {
    "test_in_test.py": "from conftest import require\n"
                       "def test_a():\n    require(False, 'a thing (apt install thing)')\n",
    "test_in_fixture.py": "import pytest\nfrom conftest import require_module\n"
                          "@pytest.fixture\ndef mod():\n"
                          "    return require_module('no_such_module_xyz', 'pip install xyz')\n"
                          "def test_b(mod):\n    pass\n",
    "test_mark.py": "from conftest import requires\n"
                    "pytestmark = requires(False, 'the C++ kernels (a compiler)')\n"
                    "def test_c():\n    pass\n",
    "test_module_level.py": "from conftest import require_module\n"
                            "xyz = require_module('no_such_module_xyz', 'pip install xyz')\n"
                            "def test_d():\n    pass\n",
    "test_importorskip.py": "import pytest\nxyz = pytest.importorskip('no_such_module_xyz')\n"
                            "def test_e():\n    pass\n",
}
OTHER_SKIP = "import pytest\ndef test_f():\n    pytest.skip('not available on this torch build')\n"


def _pytest(tmp_path: Path, strict: bool) -> subprocess.CompletedProcess:
    for name, text in {**CASES, "test_other_skip.py": OTHER_SKIP}.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "NANOSEEK_STRICT": "1" if strict else "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {strict: _pytest(tmp_path_factory.mktemp("strict" if strict else "lenient"), strict)
            for strict in (False, True)}


def test_without_strict_mode_missing_dependencies_skip(runs):
    r = runs[False]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 skipped" in r.stdout and "failed" not in r.stdout and "error" not in r.stdout.lower(), r.stdout


def test_strict_mode_fails_every_missing_dependency_and_only_those(runs):
    r = runs[True]
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    for name in CASES:
        assert f"{name}" in out and ("FAILED" in out or "ERROR" in out), (name, out)
    assert "1 skipped" in out and "not available on this torch build" in out, out
    assert out.count("NANOSEEK_STRICT=1 turns this skip into a failure") >= len(CASES), out
    for what in ("a thing (apt install thing)", "pip install xyz", "the C++ kernels (a compiler)",
                 "could not import 'no_such_module_xyz'"):
        assert what in out, (what, out)
