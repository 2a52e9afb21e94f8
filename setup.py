"""Build hook: generate protos/*_pb2*.py before packaging (metadata lives in pyproject.toml).

build_py runs for `pip install .` (files are then copied into the wheel) and for
`pip install -e .` (the editable install points at the source tree, where they are written).
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self):
        # Load protos/build.py by path: importing the `protos` package here would pick up
        # whatever copy is installed instead of this source tree.
        spec = importlib.util.spec_from_file_location(
            "_tandem_protos_build", ROOT / "protos/build.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(ROOT / "protos")
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
