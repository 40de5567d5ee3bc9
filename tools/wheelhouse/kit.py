"""Writing a kit: the shipped files, ``requirements.lock``, ``manifest.json``, ``install.sh``, ``SHA256SUMS``
(``sha256sum -c`` format, over whole files) and, with ``split_mib``, large files cut into ``NAME.partNN``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from tools.wheelhouse.resolve import Resolution
from tools.wheelhouse.targets import Target

INSTALL_SH = Path(__file__).parent / "install.sh"
MIB = 1 << 20


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (wheels run to hundreds of MiB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(resolution: Resolution, target: Target, pins: tuple[str, ...], out: Path) -> dict:
    dists = []
    for pick in sorted(resolution.picks.values(), key=lambda p: p.name):
        entry = {"name": pick.name, "version": str(pick.version), "filename": pick.path.name,
                 "shipped": pick.shipped, "replaces": pick.replaces, "extras": sorted(pick.extras - {""}),
                 "required_by": sorted(pick.required_by), "requires": pick.requires}
        if pick.shipped:
            entry.update(size=(out / pick.path.name).stat().st_size, sha256=sha256_of(out / pick.path.name))
        dists.append(entry)
    return {"target": dataclasses.asdict(target), "pins": list(pins), "dists": dists,
            "image_satisfied": dict(sorted(resolution.satisfied.items()))}


def split_file(path: Path, part_mib: int) -> list[Path]:
    """Cut ``path`` into ``NAME.part00``, ``NAME.part01``, ... of ``part_mib`` MiB (the last one shorter) and
    remove it; numbers are zero-padded to one width so that a shell glob lists them in order."""
    size = part_mib * MIB
    count = -(-path.stat().st_size // size)
    width = max(2, len(str(count - 1)))
    parts = []
    with path.open("rb") as whole:
        for i in range(count):
            part = path.with_name(f"{path.name}.part{i:0{width}d}")
            with part.open("wb") as f:
                left = size
                while left and (block := whole.read(min(MIB, left))):
                    f.write(block)
                    left -= len(block)
            parts.append(part)
    path.unlink()
    return parts


def write_sums(out: Path) -> Path:
    """SHA256SUMS over every file in ``out``, in ``sha256sum -c`` format (two spaces, sorted by name)."""
    names = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    sums = out / "SHA256SUMS"
    sums.write_text("".join(f"{sha256_of(out / name)}  {name}\n" for name in names))
    return sums


def write_kit(out: Path, resolution: Resolution, target: Target, pins: tuple[str, ...],
              split_mib: int | None = None) -> list[Path]:
    """Move the shipped picks from the download pool into ``out`` and write the kit's other files there.
    Returns the kit's files as they lie after splitting."""
    shipped = sorted((p for p in resolution.picks.values() if p.shipped), key=lambda p: p.name)
    for pick in shipped:
        shutil.move(pick.path, out / pick.path.name)
    (out / "requirements.lock").write_text("".join(f"{p.name}=={p.version}\n" for p in shipped))
    manifest = _manifest(resolution, target, pins, out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.copyfile(INSTALL_SH, out / "install.sh")
    (out / "install.sh").chmod(0o755)
    write_sums(out)
    if split_mib:
        for pick in shipped:
            if (out / pick.path.name).stat().st_size > split_mib * MIB:
                split_file(out / pick.path.name, split_mib)
    return sorted(p for p in out.iterdir() if p.is_file())
