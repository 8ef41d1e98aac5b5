"""The distribution installs every package of the tree, and no top-level folder shadows a package that a
dependency imports (transformers imports PyPI's `kernels`)."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setuptools() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_directory_is_installed():
    on_disk = set()
    for top in ("braidinfer", "braid_langchain", "braid_kernels"):
        for directory, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                on_disk.add(os.path.relpath(directory, ROOT).replace(os.sep, "."))
    listed = set(_setuptools()["packages"])
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_no_folder_shadows_pypi_kernels():
    """`kernels` is a transformers dependency on PyPI; a package folder of that name at the root would be imported
    in its place by any run with the root on sys.path."""
    assert not os.path.exists(os.path.join(ROOT, "kernels"))
    assert "package-dir" not in _setuptools()
    import braid_kernels

    assert os.path.samefile(os.path.dirname(braid_kernels.__file__), os.path.join(ROOT, "braid_kernels"))


def test_loading_the_engine_modules_leaves_braid_kernels_unimported():
    """braid_kernels reads TRITON_INTERPRET when imported, so the engine imports it only when a kernel is used:
    a test (or user) that imports braidinfer first can still run the kernels interpreted."""
    import subprocess
    import sys

    code = ("import sys, braidinfer, braidinfer.engine, braidinfer.layers.quant_linear; "
            "print(sorted(m for m in sys.modules if m.startswith('braid_kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cpu_kernels_sources_are_installed_and_built():
    """braid_kernels' C sources are package data, compiled on first use: each .c and .h there matches a
    package-data pattern, and is one the build compiles (SOURCES) or hashes into the library's name (HEADERS)."""
    import fnmatch

    from braid_kernels.cpu_library import HEADERS, SOURCES

    patterns = _setuptools()["package-data"]["braid_kernels"]
    files = [f for f in os.listdir(os.path.join(ROOT, "braid_kernels")) if f.endswith((".c", ".h"))]
    assert files and all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files)
    assert sorted(files) == sorted(SOURCES + HEADERS)
