"""ALLO_TEST_FAILURES (tests/conftest.py): each failure's traceback reaches the file as it happens, once,
also under pytest-xdist; benchmarks/gpu_check.sh relies on it when its time limit cuts a pytest run."""

import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("workers", [0, 2])
def test_failures_are_logged_as_they_happen(tmp_path, workers):
    if workers:
        pytest.importorskip("xdist")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent('''
        import pytest

        def test_passes():
            pass

        def test_fails():
            assert 1 + 1 == 3, "arithmetic"

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_errors(broken):
            pass
    '''))
    log = tmp_path / "failures.txt"
    # tests/conftest.py loaded as a plugin (the sample lives outside tests/)
    env = {**os.environ, "ALLO_TEST_FAILURES": str(log), "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTEST_XDIST_WORKER", None)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(tmp_path / "test_sample.py")]
    if workers:
        args += ["-n", str(workers)]
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = log.read_text()
    heads = [line for line in text.splitlines() if line.startswith("=== ")]
    assert sorted(heads) == ["=== test_sample.py::test_errors (setup)", "=== test_sample.py::test_fails (call)"], text
    assert "arithmetic" in text and "fixture broke" in text
