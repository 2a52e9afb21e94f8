"""Build hooks (metadata lives in pyproject.toml):

- generate protos/*_pb2*.py before packaging;
- install the folder kernels/ under the import name `tandem_kernels`. transformers (>= 5.2x)
  depends on Hugging Face's `kernels` package, so a package of ours named `kernels` would shadow
  it (from the repository root) or be shadowed by it (anywhere else). kernels/ has no
  __init__.py, so from the repository root `import kernels` still finds Hugging Face's.

build_py runs for `pip install .` (files are then copied into the wheel) and for
`pip install -e .` (the editable install points at the source tree, where they are written).
"""

import importlib.util
from pathlib import Path

from setuptools import find_namespace_packages, setup
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


# the top-level source folders that are shipped (tests/deploy checks the Dockerfile copies each)
SOURCE_FOLDERS = (
    "tandem_cli", "bench", "gateway", "router", "prefill_service", "decode_service", "worker",
    "kvtransfer", "tandem", "kernels", "protos", "rpc",
)  # fmt: skip
RENAMED = {"tandem_kernels": "kernels"}  # import name -> folder
found = find_namespace_packages(
    where=str(ROOT), include=[f"{f}*" for f in SOURCE_FOLDERS if f not in RENAMED.values()]
)
# like the folders found above, a renamed one ships when it is there (tests build partial trees)
renamed = {name: f for name, f in RENAMED.items() if (ROOT / f).is_dir()}
setup(
    cmdclass={"build_py": BuildPyWithProtos},
    packages=[*found, *renamed],
    package_dir=renamed,
)
