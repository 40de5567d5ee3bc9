"""tools.wheelhouse, offline: the H100 kit's file list replayed from a recorded resolution, the resolver's
restarts, SHA256SUMS and split parts through install.sh (with a stand-in Python), unknown targets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.wheelhouse.__main__ import build_kit, main
from tools.wheelhouse.index import NoDistribution, download_sdist
from tools.wheelhouse.kit import INSTALL_SH, MIB, split_file, write_sums
from tools.wheelhouse.resolve import ResolutionError, read_have, resolve
from tools.wheelhouse.targets import KNOWN_TARGETS, Target, UnknownTarget, known_target, sdist_requires

DATA = Path(__file__).resolve().parents[1] / "data" / "wheelhouse"
H100 = Target("3.12", "2.11", "13")


class FakeIndex:
    """The index as the resolver sees it, from a table name -> [(version, Requires-Dist lines, filename)]:
    ``wheel`` picks the newest version in the requirement's range, as pip would; ``get`` serves a simple-index
    page (with sha256 fragments) and the sdist files it links, each with only a PKG-INFO inside."""

    index_url = "https://index.invalid/simple"

    def __init__(self, dists: dict[str, list[tuple[str, list[str], str]]]):
        self.dists = {canonicalize_name(n): [(Version(v), r, f) for v, r, f in d] for n, d in dists.items()}

    @classmethod
    def from_manifest(cls, path: Path) -> FakeIndex:
        """Replay a kit's manifest.json: pip's pick for each package when it was recorded."""
        dists = json.loads(path.read_text())["dists"]
        return cls({d["name"]: [(d["version"], d["requires"], d["filename"])] for d in dists})

    def wheel(self, requirement: str, target: Target, dest: Path) -> Path:
        req = Requirement(requirement)
        fits = [d for d in self.dists.get(canonicalize_name(req.name), [])
                if req.specifier.contains(d[0], prereleases=True) and d[2].endswith(".whl")]
        if not fits:
            raise NoDistribution(f"no wheel of {requirement}")
        version, requires, filename = max(fits, key=lambda d: d[0])
        stem = "-".join(filename.split("-")[:2])
        with zipfile.ZipFile(dest / filename, "w") as archive:
            archive.writestr(f"{stem}.dist-info/METADATA", _metadata(req.name, version, requires))
        return dest / filename

    def get(self, url: str) -> bytes:
        sdists = {f: (name, v, r) for name, dists in self.dists.items() for v, r, f in dists if f.endswith(".tar.gz")}
        filename = url.rsplit("/", 1)[1]
        if filename in sdists:
            return _sdist_bytes(filename, *sdists[filename])
        name = url.rstrip("/").rsplit("/", 1)[1]
        anchors = [f'<a href="../../files/{f}#sha256={hashlib.sha256(_sdist_bytes(f, *s)).hexdigest()}" '
                   f'data-requires-python="&gt;=3.10">{f}</a>' for f, s in sdists.items() if s[0] == name]
        return f"<html><body>{''.join(anchors)}</body></html>".encode()


def _metadata(name: str, version: Version, requires: list[str]) -> str:
    return f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)


def _sdist_bytes(filename: str, name: str, version: Version, requires: list[str]) -> bytes:
    """A deterministic tar.gz (fixed mtime) holding only ``<base>/PKG-INFO``."""
    info = _metadata(name, version, requires).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo(f"{filename.removesuffix('.tar.gz')}/PKG-INFO")
        member.size, member.mtime = len(info), 0
        archive.addfile(member, io.BytesIO(info))
    return raw.getvalue()


def _wheel(name: str, version: str, *requires: str) -> tuple[str, list[str], str]:
    return version, list(requires), f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


# --- the H100 kit, replayed ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h100_kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit")
    index = FakeIndex.from_manifest(DATA / "h100-manifest.json")
    resolution = build_kit(H100, out, ["gpu"], index)
    return out, resolution


def test_h100_kit_ships_the_pinned_gpu_stack(h100_kit):
    out, _ = h100_kit
    lock = set((out / "requirements.lock").read_text().split())
    for pinned in ("transformer-engine==2.12.0", "transformer-engine-cu13==2.12.0", "transformer-engine-torch==2.12.0",
                   "vllm==0.26.0", "nvidia-modelopt==0.47.0", "megatron-core==0.19.2"):
        assert pinned in lock
    names = {line.split("==")[0] for line in lock}
    assert {"pydantic", "pydantic-core", "nvdlfw-inspect"} <= names
    files = {p.name for p in out.iterdir()}
    assert "transformer_engine_torch-2.12.0.tar.gz" in files
    assert "transformer_engine_cu13-2.12.0-py3-none-manylinux_2_28_x86_64.whl" in files
    assert {"SHA256SUMS", "install.sh", "requirements.lock", "manifest.json"} <= files


def test_h100_kit_matches_the_recorded_resolution(h100_kit):
    out, _ = h100_kit
    recorded = json.loads((DATA / "h100-manifest.json").read_text())["dists"]
    made = json.loads((out / "manifest.json").read_text())["dists"]
    assert [(d["filename"], d["shipped"], d["replaces"]) for d in made] == \
        [(d["filename"], d["shipped"], d["replaces"]) for d in recorded]


def test_h100_kit_skips_what_the_image_has(h100_kit):
    _, resolution = h100_kit
    have = read_have(known_target(H100).image)
    shipped = {p.name: p for p in resolution.picks.values() if p.shipped}
    assert not {"torch", "triton", "torchvision", "torchaudio", "transformers", "nvidia-cudnn-cu13"} & set(shipped)
    for name in set(shipped) & set(have):
        # Only a replacement: the image's version fails what the kit's packages ask of it.
        assert shipped[name].replaces == str(have[name])
    assert resolution.satisfied["torch"] == "2.11.0"
    assert not set(resolution.satisfied) & set(shipped)


def test_transformer_engine_torch_requires_the_cuda13_core():
    assert sdist_requires("transformer_engine_torch", ["pydantic", "transformer_engine_cu12==2.12.0"], H100) == \
        ["pydantic", "transformer_engine_cu13==2.12.0"]
    assert sdist_requires("other", ["transformer_engine_cu12==1"], H100) == ["transformer_engine_cu12==1"]


# --- targets and the command line -----------------------------------------------------------------------------


def test_unknown_target_names_the_known_ones(tmp_path, capsys):
    with pytest.raises(UnknownTarget, match=r"Known targets: python 3\.12 / torch 2\.11 / cuda 13"):
        known_target(Target("3.12", "2.13", "13"))
    assert main(["--python", "3.11", "--torch", "2.11", "--cuda", "13", "--out", str(tmp_path / "kit")]) == 2
    assert "python 3.12 / torch 2.11 / cuda 13" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


def test_known_targets_have_their_image_lists():
    for key, known in KNOWN_TARGETS.items():
        have = read_have(known.image)
        assert str(have["torch"]).startswith(key[1] + ".")


def test_read_have_takes_freeze_and_list_formats(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# comment\nTorch==2.11.0+cu130\nmy_pkg @ file:///src/my_pkg\n-e git+https://x/y#egg=y\n\n")
    assert read_have(freeze) == {"torch": Version("2.11.0+cu130"), "my-pkg": None}


# --- the resolver ---------------------------------------------------------------------------------------------


def _resolve(tmp_path, dists, roots, pins=(), have=None):
    index = FakeIndex(dists)
    return resolve(roots, pins, H100, have or {}, index, tmp_path), index


def test_a_later_requirement_narrows_an_earlier_pick(tmp_path):
    dists = {"a": [_wheel("a", "1.0", "c")], "b": [_wheel("b", "1.0", "c<2")],
             "c": [_wheel("c", "1.5"), _wheel("c", "2.0")]}
    resolution, _ = _resolve(tmp_path, dists, ["a", "b"])
    assert resolution.picks["c"].version == Version("1.5")


def test_a_dead_end_moves_an_unpinned_requirer_back(tmp_path):
    # vllm pins ffi==1; the newest kernels needs ffi>=2, so the older kernels is taken (as pip backtracks).
    dists = {"vllm": [_wheel("vllm", "1.0", "ffi==1", "kernels")], "ffi": [_wheel("ffi", "1"), _wheel("ffi", "2")],
             "kernels": [_wheel("kernels", "0.5", "ffi"), _wheel("kernels", "0.6", "ffi>=2")]}
    resolution, _ = _resolve(tmp_path, dists, ["vllm"], pins=("vllm==1.0",))
    assert {n: str(p.version) for n, p in resolution.picks.items()} == {"vllm": "1.0", "ffi": "1", "kernels": "0.5"}


def test_pinned_requirers_that_disagree_are_reported(tmp_path):
    dists = {"a": [_wheel("a", "1", "c==1")], "b": [_wheel("b", "1", "c==2")],
             "c": [_wheel("c", "1"), _wheel("c", "2")]}
    with pytest.raises(ResolutionError, match="no file of c fits .*a 1 needs ==1.*b 1 needs ==2"):
        _resolve(tmp_path, dists, ["a", "b"], pins=("a==1", "b==1"))


def test_the_image_satisfies_replaces_or_refuses(tmp_path):
    dists = {"app": [_wheel("app", "1", "numpy<2.5", "requests", "tool[fast]")],
             "numpy": [_wheel("numpy", "2.4.0")], "tool": [_wheel("tool", "3", "speedup; extra == 'fast'")],
             "speedup": [_wheel("speedup", "1")]}
    have = {"numpy": Version("2.5.2"), "requests": Version("2.34.2"), "tool": Version("3")}
    resolution, _ = _resolve(tmp_path, dists, ["app"], have=have)
    picks = resolution.picks
    assert (picks["numpy"].shipped, picks["numpy"].replaces) == (True, "2.5.2")
    assert "requests" not in picks and resolution.satisfied["requests"] == "2.34.2"
    # The image has tool; it is read (not shipped) only for what its extra adds.
    assert not picks["tool"].shipped and picks["speedup"].shipped
    with pytest.raises(ResolutionError, match="never replaces"):
        _resolve(tmp_path, {"app": [_wheel("app", "2", "torch==2.13.0")]}, ["app"],
                 have={"torch": Version("2.11.0")})


def test_markers_are_evaluated_for_the_target(tmp_path):
    dists = {"app": [_wheel("app", "1", "linux-only; sys_platform == 'linux'", "win; sys_platform == 'win32'",
                            "old; python_version < '3.11'", "dev; extra == 'dev'")],
             "linux-only": [_wheel("linux-only", "1")]}
    resolution, _ = _resolve(tmp_path, dists, ["app"])
    assert set(resolution.picks) == {"app", "linux-only"}


def test_sdist_sha256_is_checked_against_the_index(tmp_path):
    index = FakeIndex({"te-torch": [("1.0", ["torch"], "te_torch-1.0.tar.gz")]})
    path = download_sdist(index, "te-torch", Requirement("te-torch==1.0").specifier, H100, tmp_path)
    assert path.name == "te_torch-1.0.tar.gz"
    path.unlink()

    class Tampered(FakeIndex):
        def get(self, url):
            body = super().get(url)
            return body if url.endswith("/") else body + b"x"

    with pytest.raises(NoDistribution, match="sha256 differs"):
        download_sdist(Tampered({"te-torch": [("1.0", ["torch"], "te_torch-1.0.tar.gz")]}), "te-torch",
                       Requirement("te-torch").specifier, H100, tmp_path)


# --- the kit's files and install.sh ---------------------------------------------------------------------------

STAND_IN_PYTHON = """#!/usr/bin/env bash
# Stands in for the target's python: logs its arguments (and the TE build variables) and reads a script on stdin.
echo "NVTE_FRAMEWORK=${NVTE_FRAMEWORK:-} FORCE=${NVTE_PYTORCH_FORCE_BUILD:-} MAX_JOBS=${MAX_JOBS:-} $*" >>"$LOG"
[[ ${1:-} == - ]] && cat >/dev/null
exit 0
"""


def _kit(tmp_path: Path) -> Path:
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "big-1.0-py3-none-any.whl").write_bytes(os.urandom(2 * MIB + 12345))
    (kit / "small-1.0-py3-none-any.whl").write_bytes(b"small")
    (kit / "transformer_engine_torch-2.12.0.tar.gz").write_bytes(b"sdist")
    (kit / "requirements.lock").write_text("big==1.0\nsmall==1.0\ntransformer-engine-torch==2.12.0\n")
    (kit / "manifest.json").write_text(json.dumps({"target": {"python": "3.12", "torch": "2.11", "cuda": "13"}}))
    (kit / "install.sh").write_bytes(INSTALL_SH.read_bytes())
    write_sums(kit)
    return kit


def _install(kit: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    python, log = tmp_path / "python", tmp_path / "log"
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "LOG": str(log)}
    done = subprocess.run(["bash", str(kit / "install.sh")], check=False, capture_output=True, text=True, env=env)
    return done, log.read_text().splitlines() if log.exists() else []


def test_install_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(INSTALL_SH)], check=True)


def test_split_parts_join_and_verify_through_install_sh(tmp_path):
    kit = _kit(tmp_path)
    big = kit / "big-1.0-py3-none-any.whl"
    original = big.read_bytes()
    parts = split_file(big, 1)
    assert [p.name for p in parts] == [f"{big.name}.part0{i}" for i in range(3)]
    assert not big.exists() and [p.stat().st_size for p in parts] == [MIB, MIB, 12345]

    done, log = _install(kit, tmp_path)
    assert done.returncode == 0, done.stderr
    assert big.read_bytes() == original
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=kit, check=True)
    pip_wheels = next(line for line in log if "pip install" in line and ".whl" in line)
    assert "--no-index --find-links . ./big-1.0-py3-none-any.whl ./small-1.0-py3-none-any.whl" in pip_wheels
    build = next(line for line in log if ".tar.gz" in line)
    assert build.startswith("NVTE_FRAMEWORK=pytorch FORCE=TRUE MAX_JOBS=16 ")
    assert "--no-index --find-links . --no-build-isolation ./transformer_engine_torch-2.12.0.tar.gz" in build
    assert any('-c import transformer_engine.pytorch' in line for line in log)


def test_install_sh_stops_on_a_corrupt_part_before_installing(tmp_path):
    kit = _kit(tmp_path)
    parts = split_file(kit / "big-1.0-py3-none-any.whl", 1)
    data = bytearray(parts[1].read_bytes())
    data[7] ^= 1
    parts[1].write_bytes(bytes(data))
    done, log = _install(kit, tmp_path)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr
    assert log == []
