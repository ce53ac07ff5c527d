"""An installed (non-editable) allo carries its C/C++/CUDA sources: it compiles its C loops on first use
and the extension just in time when allo._C is missing, so a wheel without csrc/ would be broken."""

import os
import subprocess
import sys

import allo._sources as sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_py_copies_csrc_into_the_package_and_csrc_dir_finds_it(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "ALLO_BUILD_CUDA": "0"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wanted = [os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "csrc"))
              for d, _, files in os.walk(os.path.join(ROOT, "csrc")) for f in files if f.endswith((".c", ".cpp", ".cu", ".h"))]
    assert {"logprob.cpp", "logprob_cuda.cu", os.path.join("cpu", "masked_adamw.c")} <= set(wanted)
    for rel in wanted:
        assert (lib / "allo" / "_csrc" / rel).read_bytes() == open(os.path.join(ROOT, "csrc", rel), "rb").read(), rel
    # installed: no checkout beside the package, so the sources are the package's own copy
    monkeypatch.setattr(sources, "_PACKAGE", str(lib / "allo"))
    assert sources.csrc_dir() == str(lib / "allo" / "_csrc")


def test_a_checkout_compiles_its_own_csrc():
    assert sources.csrc_dir() == os.path.join(ROOT, "csrc")
