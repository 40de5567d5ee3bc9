"""Download, for one target image, every file the project and its extras need that the image lacks, with an
offline install script.

    python -m tools.wheelhouse --python 3.12 --torch 2.11 --cuda 13 --out DIR \\
        [--have pip-freeze.txt] [--extras gpu[,quant,...]] [--split-mib 60] [--glibc 2.39] [--index-url URL]

DIR then holds the wheels, the sdists that are built on the target, requirements.lock, manifest.json (why each
file is there, which image package it replaces), SHA256SUMS and install.sh; copy it over and run
``bash DIR/install.sh`` there (docs/wheelhouse.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tools.wheelhouse.index import PYPI, NoDistribution, PipIndex
from tools.wheelhouse.kit import MIB, write_kit
from tools.wheelhouse.resolve import Resolution, ResolutionError, project_requirements, read_have, resolve
from tools.wheelhouse.targets import Target, UnknownTarget, known_target, with_image_glibc

SETUP_PY = Path(__file__).resolve().parents[2] / "setup.py"


def build_kit(target: Target, out: Path, extras: list[str], index, have_file: Path | None = None,
              split_mib: int | None = None) -> Resolution:
    """Resolve the project's requirements for ``target`` against ``index`` and write the kit into ``out``
    (which must be new or empty: install.sh installs every wheel it finds there)."""
    known = known_target(target)
    target = with_image_glibc(target)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ResolutionError(f"{out} is not empty")
    have = read_have(have_file or known.image)
    roots = project_requirements(SETUP_PY, extras)
    with tempfile.TemporaryDirectory(dir=out, prefix=".pool-") as pool:
        resolution = resolve(roots, known.pins, target, have, index, Path(pool))
        write_kit(out, resolution, target, known.pins, split_mib)
    return resolution


def _summary(resolution: Resolution, out: Path) -> str:
    shipped = sorted((p for p in resolution.picks.values() if p.shipped), key=lambda p: p.name)
    sizes = {p.name: (out / p.path.name).stat().st_size if (out / p.path.name).exists() else
             sum(f.stat().st_size for f in out.glob(p.path.name + ".part*")) for p in shipped}
    lines = [f"{sizes[p.name] / MIB:9.1f} MiB  {p.path.name}" + (f"  (replaces {p.replaces})" if p.replaces else "")
             for p in shipped]
    lines.append(f"{sum(sizes.values()) / MIB:9.1f} MiB  in {len(shipped)} files -> {out}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.wheelhouse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", required=True, help="the image's Python, major.minor (3.12)")
    parser.add_argument("--torch", required=True, help="the image's torch, major.minor (2.11)")
    parser.add_argument("--cuda", required=True, help="the CUDA major of the image's torch (13)")
    parser.add_argument("--out", required=True, type=Path, help="new or empty folder for the kit")
    parser.add_argument("--have", type=Path, help="the image's `pip list --format=freeze` (what it already has); "
                        "default: the list recorded for the known target")
    parser.add_argument("--extras", default="gpu", help="comma-separated extras of setup.py (default: gpu)")
    parser.add_argument("--split-mib", type=int, help="cut files larger than N MiB into NAME.partNN")
    parser.add_argument("--glibc", help="oldest glibc of the machines the kit is for (default: the known image's)")
    parser.add_argument("--index-url", default=PYPI, help=f"simple index to download from (default {PYPI})")
    args = parser.parse_args(argv)
    target = Target(args.python, args.torch, args.cuda, glibc=args.glibc)
    try:
        resolution = build_kit(target, args.out, args.extras.split(","), PipIndex(args.index_url), args.have,
                               args.split_mib)
    except (UnknownTarget, ResolutionError, NoDistribution) as err:
        print(f"wheelhouse: {err}", file=sys.stderr)
        return 2
    print(_summary(resolution, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
