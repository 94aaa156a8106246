"""The generated protobuf / gRPC modules.

They are generated at build time (setup.py's build_py puts them in the wheel) or, in a source
checkout, by `./dev.sh setup`; importing never generates them, so an install can be read-only.
"""

import warnings

from atelier.server import protogen

try:
    from atelier.v1 import atelier_pb2 as pb
    from atelier.v1 import atelier_pb2_grpc as pb_grpc
except ModuleNotFoundError as error:
    if not (error.name or "").startswith("atelier.v1"):
        raise  # a missing dependency of the generated code (grpc, protobuf): its own message says which
    raise ImportError(
        f"atelier's generated gRPC modules are missing ({error.name} not found). In a source checkout run "
        "`./dev.sh setup` or `python -m atelier.server.protogen`; otherwise reinstall atelier with pip "
        "(`pip install .`: its build generates them into the package)."
    ) from error

if protogen.is_stale():  # only a source checkout has proto/ beside the package
    warnings.warn("atelier/v1's generated gRPC modules are older than proto/: run `./dev.sh setup` or "
                  "`python -m atelier.server.protogen` to regenerate them", stacklevel=2)

__all__ = ["pb", "pb_grpc"]
