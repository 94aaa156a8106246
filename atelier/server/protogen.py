"""Generate the gRPC Python code from proto/ (never edited by hand, never committed).

One implementation, two destinations:
- a source checkout: `python -m atelier.server.protogen` (run by `./dev.sh setup`) writes
  `atelier/v1/*_pb2*.py` beside the package, which is what the editable install imports;
- a wheel: setup.py's build_py calls `generate(build_lib)`, so the modules ship in the wheel.

Importing atelier never runs this (see atelier.server.wire). This module must only need the
standard library and grpcio-tools: setup.py loads it by path, without importing atelier.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding the atelier package
PROTO_ROOT = PACKAGE_PARENT / "proto"
GENERATED_PACKAGE = Path("atelier", "v1")  # where protoc puts proto/atelier/v1/*.proto, under an output root


def protos(proto_root: Path = PROTO_ROOT) -> list[Path]:
    # Only atelier's own protos: installed, PACKAGE_PARENT is site-packages, whose proto/ (if any) is not ours.
    return sorted((proto_root / "atelier").rglob("*.proto"))


def is_stale(output_root: Path = PACKAGE_PARENT, proto_root: Path = PROTO_ROOT) -> bool:
    """Whether the generated modules under `output_root` are missing or older than the .proto files."""
    sources = protos(proto_root)
    if not sources:
        return False  # installed without proto/: the generated files shipped with the package
    generated = list((output_root / GENERATED_PACKAGE).glob("*_pb2*.py"))
    if len(generated) < 2 * len(sources):
        return True
    return max(p.stat().st_mtime for p in sources) > min(p.stat().st_mtime for p in generated)


def outputs(output_root: Path = PACKAGE_PARENT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The files `generate` writes under `output_root` (each .proto: _pb2.py, _pb2_grpc.py, _pb2.pyi)."""
    files = [output_root / GENERATED_PACKAGE / "__init__.py"]
    for source in protos(proto_root):
        stem = output_root / source.relative_to(proto_root).with_suffix("")
        files += [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")]
    return sorted(files)


def generate(output_root: Path = PACKAGE_PARENT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write `atelier/v1/*_pb2.py`, `*_pb2_grpc.py`, `*_pb2.pyi` and `__init__.py` under `output_root`."""
    import grpc_tools
    from grpc_tools import protoc

    sources = protos(proto_root)
    if not sources:
        raise FileNotFoundError(f"no .proto files under {proto_root / 'atelier'}")
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)  # protoc creates the package folders, not the root
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={output_root}",
            f"--grpc_python_out={output_root}", f"--pyi_out={output_root}", *map(str, sources)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
    (output_root / GENERATED_PACKAGE / "__init__.py").touch()
    written = outputs(output_root, proto_root)
    missing = [str(p) for p in written if not p.is_file()]
    if missing:
        raise RuntimeError(f"protoc did not write {', '.join(missing)}")
    return written


if __name__ == "__main__":
    # Optional argument: another output root (default: beside this checkout's atelier package).
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_PARENT):
        print(path, file=sys.stderr)
