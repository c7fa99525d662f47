"""`python -m annotators list | fetch NAME [--dest DIR] | verify DIR`: manage annotator weight files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import registry, weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m annotators")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="annotators, their weight files and licences")
    f = sub.add_parser("fetch", help="download a weight file (verified against its SHA-256)")
    f.add_argument("name", nargs="+", help="file name(s), or 'all'")
    f.add_argument("--dest", default=str(Path("models") / "annotators"))
    v = sub.add_parser("verify", help="check the weight files in a folder against the manifest")
    v.add_argument("folder", nargs="?", default=str(Path("models") / "annotators"))
    args = ap.parse_args(argv)
    registry.load_all()
    if args.cmd == "list":
        for key, info in sorted(registry.ANNOTATORS.items()):
            files = ", ".join(info.weights) or "no weights"
            print(f"{key:22} {info.title:40} {files}  [{info.licence}]")
        return 0
    if args.cmd == "fetch":
        names = sorted(weights.MANIFEST) if args.name == ["all"] else args.name
        rc = 0
        for n in names:
            try:
                print(f"{n}: {weights.fetch(n, args.dest)}")
            except weights.AnnotatorWeightsError as e:
                print(f"{n}: {e}", file=sys.stderr)
                rc = 2
        return rc
    rc = 0
    for n, spec in sorted(weights.MANIFEST.items()):
        p = Path(args.folder) / n
        if not p.is_file():
            print(f"{n}: missing")
            continue
        try:
            weights.verify(p, spec)
            print(f"{n}: ok" if spec.sha256 else f"{n}: present (no published hash to check)")
        except weights.AnnotatorWeightsError as e:
            print(f"{n}: {e}")
            rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
