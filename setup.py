"""Packaging hook: generate the gRPC modules (atelier/v1) from proto/ while building.

Everything else about the package is in pyproject.toml. The generated modules are never committed,
so a wheel (built from a checkout or from an sdist) gets them from this build_py, not from the tree.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def load_protogen():
    # By path, not `import atelier...`: the isolated build environment has grpcio-tools but none of
    # atelier's runtime dependencies, and protogen needs only the standard library and grpcio-tools.
    spec = importlib.util.spec_from_file_location("atelier_build_protogen", HERE / "atelier" / "server" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithGrpc(build_py):
    """build_py, plus atelier/v1 generated into the build output (or, editable, into the source tree)."""

    def run(self):
        super().run()
        protogen = load_protogen()
        if self.editable_mode:
            # An editable install imports the source tree itself: generate there, as ./dev.sh setup does.
            if protogen.is_stale(HERE, HERE / "proto"):
                protogen.generate(HERE, HERE / "proto")
            return
        # A build folder reused from an earlier build may hold modules of a .proto removed since.
        shutil.rmtree(Path(self.build_lib) / protogen.GENERATED_PACKAGE, ignore_errors=True)
        protogen.generate(Path(self.build_lib), HERE / "proto")

    def get_outputs(self, include_bytecode=True):
        if self.editable_mode:
            return super().get_outputs(include_bytecode)
        generated = load_protogen().outputs(Path(self.build_lib), HERE / "proto")
        return [*super().get_outputs(include_bytecode), *map(str, generated)]


setup(cmdclass={"build_py": BuildPyWithGrpc})
