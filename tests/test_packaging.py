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


def test_the_extension_sources_are_one_list_for_both_builds(monkeypatch):
    # every C++/CUDA file at the top of csrc/ is in allo._sources' lists (csrc/cpu holds the C loops that
    # allo._native builds), which setup.py builds from; the just-in-time build compiles the same files
    top = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith((".cpp", ".cu")))
    assert top == sorted(sources.EXTENSION_CPP_SOURCES + sources.EXTENSION_CUDA_SOURCES)
    from torch.utils import cpp_extension

    from allo.ops import _extension

    class Captured(Exception):
        pass

    def fake_load(**kwargs):
        raise Captured(kwargs)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    try:
        _extension._jit_build()
    except Captured as e:
        kwargs = e.args[0]
    else:
        raise AssertionError("the just-in-time build did not call cpp_extension.load")
    built = [os.path.relpath(path, os.path.join(ROOT, "csrc")) for path in kwargs["sources"]]
    with_cuda = kwargs["with_cuda"]
    assert built == list(sources.EXTENSION_CPP_SOURCES) + (list(sources.EXTENSION_CUDA_SOURCES) if with_cuda else [])
    assert kwargs["extra_cflags"][:len(sources.EXTENSION_CXX_FLAGS)] == list(sources.EXTENSION_CXX_FLAGS)


_SETUP = """
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
from allo._linkcheck import checked_build_ext
setup(name="probe", ext_modules=[CppExtension("probe", ["probe.cpp"])],
      cmdclass={"build_ext": checked_build_ext(BuildExtension.with_options(use_ninja=False))})
"""


def test_a_build_linking_libstdcxx_statically_fails_with_the_fix(tmp_path):
    # Seen on a GPU image whose CXX wrapper linked libstdc++ statically: the extension's first C++
    # exception segfaulted inside torch instead of raising. The build must refuse such a library.
    import shutil

    import pytest

    gxx = shutil.which("g++")
    if gxx is None or shutil.which("readelf") is None:
        pytest.skip("needs g++ and readelf")
    (tmp_path / "probe.cpp").write_text(
        '#include <stdexcept>\n#include <string>\nvoid probe(const char* s) { throw std::runtime_error(std::string(s)); }\n')
    (tmp_path / "setup.py").write_text(_SETUP)
    wrapper = tmp_path / "static-g++"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(sources.__file__))}
    runs = {}
    for label, cxx in (("plain", gxx), ("static", str(wrapper))):
        shutil.rmtree(tmp_path / "build", ignore_errors=True)
        runs[label] = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                                     env={**env, "CXX": cxx, "CC": cxx}, capture_output=True, text=True)
    assert runs["plain"].returncode == 0, runs["plain"].stderr[-2000:]
    assert runs["static"].returncode != 0
    assert "does not load libstdc++ dynamically" in runs["static"].stderr and "CXX=/usr/bin/g++" in runs["static"].stderr


def _setup_without_torch(mode):
    """``setup.py --version`` with torch's import failing, as under pip's build isolation."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "ALLO_BUILD_CUDA"}
    if mode is not None:
        env["ALLO_BUILD_CUDA"] = mode
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def test_allo_build_cuda_1_fails_when_torch_is_not_importable_at_build_time():
    # "fail unless the CUDA kernels are built": it succeeded, building no extension at all
    r = _setup_without_torch("1")
    assert r.returncode != 0
    assert "ALLO_BUILD_CUDA=1 but torch is not importable at build time" in r.stderr
    assert "--no-build-isolation" in r.stderr
    bad = _setup_without_torch("yes")  # checked before torch is looked for
    assert bad.returncode != 0 and "ALLO_BUILD_CUDA must be auto, 1 or 0, not 'yes'" in bad.stderr
    for mode in (None, "auto", "0"):  # the C++ kernels are then compiled on first use
        ok = _setup_without_torch(mode)
        assert ok.returncode == 0, (mode, ok.stderr[-2000:])
        assert "torch is not importable at build time" in ok.stderr
