"""Generate the Python modules for the .proto files in this package.

Run as `python -m protos.generate` (or `make protos`). protoc is given the repository
root as its include path, so the generated modules import each other as
`from protos import embedding_pb2`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from grpc_tools import protoc

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PROTOS = ("embedding.proto", "ranker.proto")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    """File names generate() writes, in a stable order."""
    return [Path(p).stem + s for p in PROTOS for s in SUFFIXES]


def generate(out_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Run protoc over PROTOS and write the generated modules into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PACKAGE_DIR / p) for p in PROTOS),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc exited with status {rc}: {' '.join(args)}")
        written = []
        for name in generated_names():
            dest = out_dir / name
            shutil.copyfile(Path(tmp) / PACKAGE_DIR.name / name, dest)
            written.append(dest)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out-dir", type=Path, default=PACKAGE_DIR, help="where to write")
    ns = parser.parse_args(argv)
    for path in generate(ns.out_dir):
        print(path)


if __name__ == "__main__":
    main()
