"""What a checkpoint directory holds, and whether it is intact: its file manifest, verification, and
which files of a directory megatron-gndpo wrote (so it never deletes anything else).

Every directory megatron-gndpo writes carries a record: ``gndpo_meta.json`` in a megatron
dist-checkpoint (training or converted), ``gndpo_export.json`` in a Hugging Face export. Its
``files`` entry lists every other file, with its size and a content hash (``hash_algorithm``:
xxh3_128 when the ``xxhash`` package is installed, else sha256), taken once the rest is on disk.

Sizes are cheap (one ``stat`` a file) and checked on every load; hashes read every byte and are
checked on demand. Hashing is collective when torch.distributed is initialised: the files are split
over the ranks and the digests gathered, so a multi-node save or check reads each file once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch.distributed as dist

from megatron_gndpo.checkpoint.metadata import META_FILE, CheckpointIntegrityError

log = logging.getLogger(__name__)

EXPORT_FILE = "gndpo_export.json"
RECORD_FILES = (META_FILE, EXPORT_FILE)
VERIFY_HASHES_ENV = "MEGATRON_GNDPO_VERIFY_HASHES"
# A checkpoint's tokenizer copy is part of it even when written after its manifest (the tokenizer of a
# checkpoint saved without one is added later, data/tokenizer.py's save_checkpoint_tokenizer).
CHECKPOINT_TOKENIZER_FILES = "tokenizer/*"
# What a dist-checkpoint without a manifest holds (megatron's torch_dist files, our tokenizer copy and a
# vision-language model's vision/ weights):
# a save in progress, or one written before manifests existed, is recognised as ours by these names.
UNRECORDED_OWN_FILES = ("*.distcp", ".metadata", "common.pt", "metadata.json", CHECKPOINT_TOKENIZER_FILES,
                        "vision/*")


def hashes_requested() -> bool:
    """Whether ``MEGATRON_GNDPO_VERIFY_HASHES=1`` asks loads (resume, student / teacher weights) to
    check content hashes as well as sizes."""
    return os.environ.get(VERIFY_HASHES_ENV, "0") not in ("", "0")


def default_algorithm() -> str:
    """xxh3_128 when ``xxhash`` is importable (several GB/s), else sha256 (always available)."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def _hasher(algorithm: str):
    if algorithm == "sha256":
        return hashlib.sha256
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise CheckpointIntegrityError("this checkpoint's hashes are xxh3_128: `pip install xxhash` to verify "
                                           "them") from None
        return xxhash.xxh3_128
    raise CheckpointIntegrityError(f"unknown hash algorithm {algorithm!r} in a checkpoint record")


def _digest(path: Path, algorithm: str) -> Optional[str]:
    """Hex digest of ``path``'s content, or None when it cannot be read (the caller reports it)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, _hasher(algorithm)).hexdigest()
    except OSError:
        return None


def _world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _from_rank0(obj):
    """``obj`` as rank 0 has it, on every rank."""
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _hash_all(root: Path, sizes: Mapping[str, int], algorithm: str) -> Dict[str, Optional[str]]:
    """Collective (every rank passes the same ``sizes``): name -> digest (None: unreadable) of the
    files under ``root``, each hashed by one rank (largest first, round robin) and gathered."""
    _hasher(algorithm)  # an unavailable algorithm fails on every rank, before any collective
    rank, world = _world()
    order = sorted(sizes, key=lambda name: (-sizes[name], name))
    mine = {name: _digest(root / name, algorithm) for name in order[rank::world]}
    if world == 1:
        return mine
    gathered: List[Dict[str, Optional[str]]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in part.items()}


def _listed_files(root: Path) -> List[str]:
    """Every file under ``root`` except its records, as sorted POSIX paths relative to it."""
    skip = set(RECORD_FILES) | {f"{name}.tmp" for name in RECORD_FILES}
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                  and p.relative_to(root).as_posix() not in skip)


def file_manifest(root: str | os.PathLike) -> Dict[str, Any]:
    """Collective: ``{"hash_algorithm", "files": {path: {"size", "hash"}}}`` for every file under
    ``root`` (records excluded), as rank 0 sees the directory."""
    root = Path(root)
    names, algorithm = _from_rank0((_listed_files(root), default_algorithm()) if _world()[0] == 0 else None)
    sizes = {name: (root / name).stat().st_size for name in names}
    digests = _hash_all(root, sizes, algorithm)
    return {"hash_algorithm": algorithm,
            "files": {name: {"size": sizes[name], "hash": digests[name]} for name in names}}


def read_record(root: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The megatron-gndpo record of directory ``root`` (``gndpo_meta.json`` or ``gndpo_export.json``),
    None when it has neither; an unreadable one is a CheckpointIntegrityError naming it."""
    for name in RECORD_FILES:
        path = Path(root) / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointIntegrityError(f"{path} is damaged: {e}") from None
    return None


def manifest_problems(root: str | os.PathLike, record: Mapping[str, Any], *, hashes: bool,
                      only: Optional[Callable[[str], bool]] = None) -> List[str]:
    """What is wrong with the files ``record`` lists under ``root`` (those ``only`` accepts, when
    given): missing, another size, and with ``hashes`` (collective) another content. Empty when
    intact; files it does not list are ignored."""
    root = Path(root)
    files = {name: entry for name, entry in record["files"].items() if only is None or only(name)}
    problems = {}
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            problems[name] = f"{path} is missing"
        elif path.stat().st_size != entry["size"]:
            problems[name] = (f"{path} has {path.stat().st_size} bytes where {entry['size']} were written "
                              "(truncated or overwritten)")
    if hashes:
        digests = _hash_all(root, {name: entry["size"] for name, entry in files.items()}, record["hash_algorithm"])
        for name, entry in files.items():
            if name not in problems and digests[name] != entry["hash"]:
                problems[name] = (f"{root / name} does not have the content it was saved with "
                                  f"({record['hash_algorithm']} differs)")
    return [problems[name] for name in sorted(problems)]


def checkpoint_problem(root: str | os.PathLike, *, hashes: bool,
                       only: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """Why the checkpoint or export at ``root`` cannot be trusted (collective with ``hashes``; its
    files ``only`` accepts, when given), or None when it is intact. One written before manifests
    existed is checked for its record only."""
    root = Path(root)
    if not root.is_dir():
        return f"{root} does not exist"
    try:
        record = read_record(root)
    except CheckpointIntegrityError as e:
        return str(e)
    if record is None:
        return f"{root} has no {' or '.join(RECORD_FILES)}: not a complete megatron-gndpo checkpoint"
    if "files" not in record:
        log.warning("%s has no file manifest (written by an earlier version): its files cannot be checked", root)
        return None
    problems = manifest_problems(root, record, hashes=hashes, only=only)
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
    return problems[0] + more


def verify_checkpoint(root: str | os.PathLike, *, hashes: bool, only: Optional[Callable[[str], bool]] = None) -> None:
    """Raises CheckpointIntegrityError naming the damaged file (of those ``only`` accepts, when
    given); ``hashes`` makes it collective."""
    problem = checkpoint_problem(root, hashes=hashes, only=only)
    if problem is not None:
        raise CheckpointIntegrityError(f"checkpoint {root} is damaged: {problem}")


def foreign_files(root: str | os.PathLike) -> List[str]:
    """Files under ``root`` that megatron-gndpo did not write there: with a manifest, those it does
    not list (records and the ``tokenizer/`` copy aside); without one (a save in progress, or one
    from before manifests), those not named like a dist-checkpoint's own files."""
    root = Path(root)
    if not root.is_dir():
        return []
    try:
        record = read_record(root)
    except CheckpointIntegrityError:
        record = None
    names = _listed_files(root)
    if record is not None and "files" in record:
        return [name for name in names
                if name not in record["files"] and not fnmatch.fnmatch(name, CHECKPOINT_TOKENIZER_FILES)]
    return [name for name in names if not any(fnmatch.fnmatch(name, p) for p in UNRECORDED_OWN_FILES)]


def remove_own_dir(path: str | os.PathLike) -> None:
    """Deletes directory ``path`` when megatron-gndpo wrote every file in it; otherwise raises
    FileExistsError naming what it would have deleted."""
    foreign = foreign_files(path)
    if foreign:
        raise FileExistsError(f"{path} holds files megatron-gndpo did not write ({', '.join(foreign[:5])}); "
                              "not deleting it")
    shutil.rmtree(path)


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Moves the finished directory ``new`` to ``final``. An existing ``final`` (the caller has decided
    it may go) is first renamed aside in the same parent, so ``final`` is never missing or half
    written, and deleted once ``new`` is in place."""
    new, final = Path(new), Path(final)
    if not (final.exists() or final.is_symlink()):
        os.replace(new, final)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, trash / final.name)
    os.replace(new, final)
    shutil.rmtree(trash)


def paths_overlap(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (resolved) are the same directory or one holds the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output_dir(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, overwrite: bool) -> Path:
    """The resolved output directory of a conversion, once it is safe to write: never an input, inside
    one or holding one; absent, empty, an earlier conversion's output holding only its own files, or
    (``overwrite``) any directory. Raises before any compute otherwise; the message names the path."""
    out = Path(out).resolve()
    for inp in inputs:
        if paths_overlap(out, Path(inp)):
            raise ValueError(f"--out {out} is, holds or lies inside the input {Path(inp).resolve()}: writing it "
                             "would destroy or change the input; choose a directory outside it")
    if not (out.exists() or out.is_symlink()):
        return out
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if overwrite or not any(out.iterdir()):
        return out
    try:
        record = read_record(out)
    except CheckpointIntegrityError:
        record = None
    if record is None or "conversion" not in record:
        raise FileExistsError(f"--out {out} is not empty and is not an earlier output of this tool: choose a new "
                              "or empty directory, or pass --overwrite to replace it")
    foreign = foreign_files(out)
    if foreign:
        raise FileExistsError(f"--out {out} is an earlier output of this tool but also holds files it did not write "
                              f"({', '.join(foreign[:5])}): move them, or pass --overwrite to replace it all")
    return out
