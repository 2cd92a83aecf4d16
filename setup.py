"""Compile protos/ into the `healthplane` package whenever the project is built or installed.

pyproject.toml holds the metadata; this file only hooks code generation into build_py, so
`pip install .`, `pip install -e .` and `make` all produce the generated modules.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(map(str, protos)))
    for proto in protos:
        package = ROOT / proto.parent.relative_to(ROOT / "protos")
        while package != ROOT:
            (package / "__init__.py").touch()
            package = package.parent


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


# Generate before setup() runs too: package discovery (and the editable install's import finder,
# built from it) only sees `healthplane.v1` if its modules already exist on a fresh clone.
compile_protos()
setup(cmdclass={"build_py": BuildPyWithProtos})
