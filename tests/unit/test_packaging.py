"""The distribution installs every package of the tree, and the kernels under a name of our own."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setuptools() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_directory_is_installed():
    on_disk = set()
    for top in ("braidinfer", "braid_langchain"):
        for directory, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                on_disk.add(os.path.relpath(directory, ROOT).replace(os.sep, "."))
    listed = set(_setuptools()["packages"])
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_the_kernels_install_as_braid_kernels():
    setuptools = _setuptools()
    assert setuptools["package-dir"] == {"braid_kernels": "kernels"}
    assert "kernels" not in setuptools["packages"]
    import braid_kernels

    assert os.path.samefile(os.path.dirname(braid_kernels.__file__), os.path.join(ROOT, "kernels"))
