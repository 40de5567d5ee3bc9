"""Which files a kit needs: walk ``Requires-Dist`` from the project's requirements, pip picking each file for the
target, skipping whatever the image's packages already satisfy.

The walk keeps one version per package and starts again when a pick turns out wrong (``resolve``); pip's answers
are cached across restarts, so a restart costs little beyond the files it newly needs.
"""

from __future__ import annotations

import email.parser
import os
import runpy
import tarfile
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

from tools.wheelhouse.index import NoDistribution, download_sdist
from tools.wheelhouse.targets import BUILT_FROM_SDIST, FROZEN, Target, sdist_requires

ROOT = "megatron-gndpo"
MAX_RESTARTS = 100


class ResolutionError(RuntimeError):
    """No set of files satisfies the requirements on the target with the pins given."""


@dataclass
class Pick:
    """One distribution the walk chose: ``shipped`` is False for a package the image has, fetched only to read
    the dependencies that requested extras add; ``replaces`` is the image's version a shipped one replaces."""

    name: str
    version: Version
    path: Path
    requires: list[str]
    shipped: bool = True
    replaces: str = ""
    extras: set[str] = field(default_factory=set)
    required_by: set[str] = field(default_factory=set)

    @property
    def sdist(self) -> bool:
        return self.path.name.endswith(".tar.gz")


@dataclass
class Resolution:
    """The picks, and the image's packages that satisfied a requirement (name -> version)."""

    picks: dict[str, Pick]
    satisfied: dict[str, str]


def read_have(path: Path) -> dict[str, Version | None]:
    """A ``pip freeze`` / ``pip list --format=freeze`` file as name -> version. A direct reference
    (``name @ url``) counts as present with an unknown version, which any requirement accepts."""
    have = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        if sep:
            have[canonicalize_name(name)] = Version(version.strip())
        else:
            have[canonicalize_name(Requirement(line).name)] = None
    return have


def project_requirements(setup_py: Path, extras: list[str]) -> list[str]:
    """``install_requires`` plus the named extras of the project's setup.py, read by running it with
    ``setuptools.setup`` captured (it reads README.md relative to its own folder)."""
    captured = {}
    cwd = os.getcwd()
    with mock.patch("setuptools.setup", lambda **kwargs: captured.update(kwargs)):
        os.chdir(setup_py.parent)
        try:
            runpy.run_path(str(setup_py))
        finally:
            os.chdir(cwd)
    known = captured.get("extras_require", {})
    unknown = sorted(set(extras) - set(known))
    if unknown:
        raise ResolutionError(f"setup.py has no extra {', '.join(unknown)}; it has {', '.join(sorted(known))}")
    return list(captured.get("install_requires", [])) + [r for extra in extras for r in known[extra]]


def _metadata_requires(text: str) -> list[str]:
    return email.parser.Parser().parsestr(text).get_all("Requires-Dist") or []


def wheel_requires(path: Path) -> list[str]:
    """``Requires-Dist`` of a wheel's top-level ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as archive:
        (member,) = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        return _metadata_requires(archive.read(member).decode())


def pkg_info_requires(path: Path) -> list[str]:
    """``Requires-Dist`` of an sdist's top-level PKG-INFO (the egg-info inside has one too)."""
    with tarfile.open(path) as archive:
        member = min((m for m in archive.getnames() if m.endswith("/PKG-INFO")), key=lambda m: m.count("/"))
        return _metadata_requires(archive.extractfile(member).read().decode())


def _version_of(path: Path) -> Version:
    if path.name.endswith(".whl"):
        return parse_wheel_filename(path.name)[1]
    return parse_sdist_filename(path.name)[1]


Edge = tuple[Pick | None, SpecifierSet]  # a requirement on a package: who asks (None: the project), for what


class _Narrow(Exception):
    """A requirement rules out a version already picked: start again with ``spec`` as the package's constraint
    (``edges``: the requirements that make it)."""

    def __init__(self, name: str, spec: SpecifierSet, edges: list[Edge]):
        super().__init__(name)
        self.name, self.spec, self.edges = name, spec, edges


class _DeadEnd(Exception):
    """No file of ``name`` fits every requirement on it: start again without one of its requirers' versions."""

    def __init__(self, name: str, edges: list[Edge], cause: Exception):
        super().__init__(name)
        self.name, self.edges, self.cause = name, edges, cause

    def describe(self) -> str:
        needs = [f"{p.name} {p.version} needs {spec or 'any'}" if p else f"{ROOT} needs {spec or 'any'}"
                 for p, spec in self.edges]
        return f"no file of {self.name} fits every requirement on it ({'; '.join(needs)}): {self.cause}"


class _Walk:
    """One pass over the requirement graph; raises _Narrow or _DeadEnd when it must start again. ``learned``
    holds the requirements behind each narrowed constraint, for a dead end to name every requirer."""

    def __init__(self, target: Target, have: dict, constraints: dict, learned: dict, index, pool: Path, cache: dict):
        self.target, self.have, self.constraints, self.learned = target, have, constraints, learned
        self.index, self.pool, self.cache = index, pool, cache
        self.picks: dict[str, Pick] = {}
        self.satisfied: dict[str, str] = {}
        self.edges: dict[str, list[Edge]] = {}

    def run(self, roots: list[str]) -> Resolution:
        env = {**self.target.markers(), "extra": ""}
        queue = deque((r, None) for r in map(Requirement, roots) if r.marker is None or r.marker.evaluate(env))
        while queue:
            queue.extend(self._visit(*queue.popleft()))
        # A package the image had may have been replaced after it satisfied the first requirements on it.
        satisfied = {name: version for name, version in self.satisfied.items() if name not in self.picks}
        return Resolution(self.picks, satisfied)

    def _requirers(self, name: str) -> list[Edge]:
        return self.edges[name] + [e for e in self.learned.get(name, []) if e not in self.edges[name]]

    def _visit(self, req: Requirement, parent: Pick | None) -> list[tuple[Requirement, Pick]]:
        name = canonicalize_name(req.name)
        self.edges.setdefault(name, []).append((parent, req.specifier))
        spec = self.constraints.get(name, SpecifierSet())
        for _, edge in self.edges[name]:
            spec &= edge
        pick = self.picks.get(name)
        if pick is None:
            return self._first_visit(name, req, spec, parent)
        pick.required_by.add(parent.name if parent else ROOT)
        if not spec.contains(pick.version, prereleases=True):
            try:
                self._fetch(name, spec)
            except NoDistribution as err:
                raise _DeadEnd(name, self._requirers(name), err) from None
            raise _Narrow(name, spec, self._requirers(name))
        new = set(req.extras) - pick.extras
        pick.extras |= new
        return self._dependencies(pick, new)

    def _first_visit(self, name: str, req: Requirement, spec: SpecifierSet, parent: Pick | None):
        present = name in self.have
        installed = self.have.get(name)
        fits = present and (installed is None or spec.contains(installed, prereleases=True))
        # An unknown installed version (a direct reference) cannot be looked up, so its extras are trusted too.
        if fits and (not req.extras or installed is None):
            self.satisfied[name] = str(installed or "")
            return []
        if present and not fits and name in FROZEN:
            raise ResolutionError(f"{parent.name if parent else ROOT} needs {name}{spec}, but the image has {name} "
                                  f"{installed}, which a kit never replaces: choose pins for the image's torch")
        try:
            pick = self._fetch(name, SpecifierSet(f"=={installed}") if fits else spec)
        except NoDistribution as err:
            raise _DeadEnd(name, self._requirers(name), err) from None
        pick.shipped, pick.replaces = not fits, str(installed) if present and not fits else ""
        pick.extras, pick.required_by = set(req.extras), {parent.name if parent else ROOT}
        self.picks[name] = pick
        return self._dependencies(pick, {""} | pick.extras)

    def _fetch(self, name: str, spec: SpecifierSet) -> Pick:
        """The file pip picks for ``name`` within ``spec``; answers, failures too, are kept across restarts."""
        key = (name, str(spec))
        if key not in self.cache:
            try:
                if name in BUILT_FROM_SDIST:
                    path = download_sdist(self.index, name, spec, self.target, self.pool)
                    self.cache[key] = (path, pkg_info_requires(path))
                else:
                    path = self.index.wheel(f"{name}{spec}", self.target, self.pool)
                    self.cache[key] = (path, wheel_requires(path))
            except NoDistribution as err:
                self.cache[key] = err
        if isinstance(self.cache[key], NoDistribution):
            raise self.cache[key]
        path, requires = self.cache[key]
        return Pick(name, _version_of(path), path, requires)

    def _dependencies(self, pick: Pick, extras: set[str]) -> list[tuple[Requirement, Pick]]:
        requires = pick.requires
        if pick.sdist:
            requires = sdist_requires(pick.name, requires, self.target) + list(BUILT_FROM_SDIST.get(pick.name, ()))
        env = self.target.markers()
        out = []
        for req in map(Requirement, requires):
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                out.append((req, pick))
        return out


def _specs(requirements) -> dict[str, SpecifierSet]:
    out = {}
    for req in map(Requirement, requirements):
        name = canonicalize_name(req.name)
        out[name] = out.get(name, SpecifierSet()) & req.specifier
    return out


def _merged(*layers: dict[str, SpecifierSet]) -> dict[str, SpecifierSet]:
    out = {}
    for layer in layers:
        for name, spec in layer.items():
            out[name] = out.get(name, SpecifierSet()) & spec
    return out


def _movable(dead: _DeadEnd, pins: dict[str, SpecifierSet]) -> Pick | None:
    """The requirer to take an older version of: the last one visited that the kit ships and no pin fixes."""
    for parent, _ in reversed(dead.edges):
        fixed = parent is not None and any(s.operator in ("==", "===") for s in pins.get(parent.name, ()))
        if parent is not None and parent.shipped and not fixed:
            return parent
    return None


def resolve(roots: list[str], pins: tuple[str, ...], target: Target, have: dict, index, pool: Path) -> Resolution:
    """The files ``roots`` need on ``target`` beyond ``have``, every version within ``pins``, downloaded to
    ``pool`` (which may keep files of picks a restart dropped).

    Two things restart the walk: a pick a later requirement rules out narrows that package's constraint; a
    package no file satisfies excludes the current version of its last-visited movable requirer (as pip's
    backtracking would), and forgets the narrowings learned so far, which that version's needs may have caused.
    """
    fixed, excluded, learned = _specs(pins), {}, {}
    cache = {}
    for _ in range(MAX_RESTARTS):
        narrowed = {name: spec for name, (spec, _) in learned.items()}
        edges = {name: requirers for name, (_, requirers) in learned.items()}
        try:
            return _Walk(target, have, _merged(fixed, excluded, narrowed), edges, index, pool, cache).run(roots)
        except _Narrow as narrow:
            learned[narrow.name] = (narrow.spec, narrow.edges)
        except _DeadEnd as dead:
            parent = _movable(dead, fixed)
            if parent is None:
                raise ResolutionError(dead.describe()) from None
            excluded[parent.name] = excluded.get(parent.name, SpecifierSet()) & SpecifierSet(f"!={parent.version}")
            learned = {}
    raise ResolutionError(f"no consistent set after {MAX_RESTARTS} restarts")
