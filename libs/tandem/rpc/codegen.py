"""Generate the Python code of the protos: `python -m tandem.rpc.codegen [--force]`.

Runs grpc_tools.protoc over every `protos/**/*.proto` with `-Iprotos --python_out=libs --grpc_python_out=libs
--pyi_out=libs`, so `protos/tandem/v1/gateway.proto` becomes the module `tandem.v1.gateway_pb2` (plus
`gateway_pb2_grpc` and `gateway_pb2.pyi`). Nothing happens when every output is newer than every proto
(protos import each other, so any change regenerates all). Outputs of protos that no longer exist are removed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "protos"
OUT_ROOT = REPO_ROOT / "libs"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
INIT_TEXT = '"""Generated from protos/ by `python -m tandem.rpc.codegen`; do not edit."""\n'


def outputs(proto: Path, proto_root: Path, out_root: Path) -> list[Path]:
    """The files protoc writes for one proto."""
    stem = out_root / proto.relative_to(proto_root).with_suffix("")
    return [stem.parent / (stem.name + suffix) for suffix in SUFFIXES]


def is_stale(protos: list[Path], proto_root: Path, out_root: Path) -> bool:
    """True when an output is missing or not newer than every proto (equal mtimes: a proto saved within the
    file system's timestamp granularity of the last generation)."""
    files = [f for proto in protos for f in outputs(proto, proto_root, out_root)]
    if not all(f.exists() for f in files):
        return True
    newest_proto = max(p.stat().st_mtime_ns for p in protos)
    return min(f.stat().st_mtime_ns for f in files) <= newest_proto


def remove_orphans(protos: list[Path], proto_root: Path, out_root: Path) -> list[Path]:
    """Delete generated files whose proto is gone; returns them."""
    expected = {f for proto in protos for f in outputs(proto, proto_root, out_root)}
    removed = []
    for package in {f.parent for f in expected}:
        for f in package.iterdir():
            if f.name.endswith(SUFFIXES) and f not in expected:
                f.unlink()
                removed.append(f)
    return removed


def generate(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT, force: bool = False) -> list[Path]:
    """Regenerate the code if any proto changed (or `force`); returns the files written (empty if none)."""
    from grpc_tools import protoc  # imported here: only installs and tests need it

    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    written: list[Path] = []
    for package in sorted({f.parent for proto in protos for f in outputs(proto, proto_root, out_root)}):
        package.mkdir(parents=True, exist_ok=True)
        init = package / "__init__.py"
        if not init.exists():
            init.write_text(INIT_TEXT)
            written.append(init)
    remove_orphans(protos, proto_root, out_root)
    if not force and not is_stale(protos, proto_root, out_root):
        return written
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto, for imports of them
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", f"--pyi_out={out_root}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_root} (its errors are printed above)")
    written += [f for proto in protos for f in outputs(proto, proto_root, out_root)]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.rpc.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help=f"proto root (default {PROTO_ROOT})")
    parser.add_argument("--out", type=Path, default=OUT_ROOT, help=f"output root (default {OUT_ROOT})")
    parser.add_argument("--force", action="store_true", help="regenerate even if nothing changed")
    args = parser.parse_args(argv)
    written = generate(args.protos, args.out, force=args.force)
    print(f"tandem.rpc.codegen: {len(written)} files written" if written else "tandem.rpc.codegen: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
