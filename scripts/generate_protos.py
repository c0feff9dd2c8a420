"""Regenerate the gRPC API's Python messages from its .proto files: ``make protos`` (``--check`` in tests).

    python scripts/generate_protos.py           # rewrite serving/protocol/v2/proto/*_pb2.py and *_pb2.pyi
    python scripts/generate_protos.py --check   # exit 1, naming the stale files, when they differ from the .proto

The generated modules are checked in rather than compiled at build time: the server and its images then need
only the protobuf runtime, not grpcio-tools (a compiler with its own protobuf pin), and a wheel or an image
build runs no code generator. grpcio-tools' ``protoc`` writes the messages (no service stubs: the gRPC front
registers its method handlers itself, ``serving/fronts/grpc/``), and one line is changed: the files are added
to the package's own descriptor pool (``serving.protocol.v2.proto.POOL``) instead of protobuf's default one.
Triton's and KServe's client packages define the same ``inference.*`` messages in the default pool, and a
process that imports either of them with these (a test, a benchmark) would otherwise fail with "duplicate
symbol". ``tests/protocol/test_grpc_codec.py`` runs ``--check``.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("serving/protocol/v2/proto")
#: In dependency order: grpc_service.proto imports model_config.proto.
PROTOS = ("model_config.proto", "grpc_service.proto", "rpc_status.proto")
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_POOL.AddSerializedFile("
POOL_IMPORT = "from serving.protocol.v2.proto import POOL as _POOL\n"


def generate(out: Path) -> list[Path]:
    """Compile every proto into ``out`` (a root the package path is created under); the files written."""
    import grpc_tools  # a developer tool: only this script needs it
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}"]
    args += [str(ROOT / PROTO_DIR / name) for name in PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for name in PROTOS:
        stem = name.removesuffix(".proto")
        module = out / PROTO_DIR / f"{stem}_pb2.py"
        text = module.read_text()
        if DEFAULT_POOL not in text:
            raise SystemExit(f"{module}: protoc's output changed; update scripts/generate_protos.py")
        header, _, rest = text.partition("\n_sym_db = ")
        text = f"{header}\n{POOL_IMPORT}\n_sym_db = {rest}".replace(DEFAULT_POOL, PRIVATE_POOL)
        module.write_text(text)
        written += [module, out / PROTO_DIR / f"{stem}_pb2.pyi"]
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a generated file is stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(ROOT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        stale = [
            path.relative_to(scratch)
            for path in generate(Path(scratch))
            if not (ROOT / path.relative_to(scratch)).exists()
            or not filecmp.cmp(path, ROOT / path.relative_to(scratch), shallow=False)
        ]
    for path in stale:
        print(f"{path} is stale: run make protos", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
