"""Generate the gRPC Python code from proto/ (never edited by hand, never committed).

`python -m atelier.server.protogen` writes `atelier/v1/*_pb2*.py` beside the package; the set-up
script runs it, and `atelier.server.wire` runs it on import when the output is missing or
older than the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding the atelier package
PROTO_ROOT = PACKAGE_PARENT / "proto"
OUTPUT = PACKAGE_PARENT / "atelier" / "v1"


def protos() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def is_stale() -> bool:
    sources = protos()
    if not sources:
        return False  # installed without proto/: the generated files shipped with the package
    outputs = list(OUTPUT.glob("*_pb2*.py"))
    if len(outputs) < 2 * len(sources):
        return True
    return max(p.stat().st_mtime for p in sources) > min(p.stat().st_mtime for p in outputs)


def generate() -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    sources = protos()
    if not sources:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={PACKAGE_PARENT}",
            f"--grpc_python_out={PACKAGE_PARENT}", f"--pyi_out={PACKAGE_PARENT}", *map(str, sources)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
    (OUTPUT / "__init__.py").touch()
    return sorted(OUTPUT.glob("*_pb2*.py"))


if __name__ == "__main__":
    for path in generate():
        print(path, file=sys.stderr)
