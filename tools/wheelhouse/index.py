"""Everything that reaches the package index, behind one small class the tests replace with a recorded snapshot:
pip picks and downloads wheels for the target's tags, urllib reads simple-index pages and sdists."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin

from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import Version

from tools.wheelhouse.targets import Target

PYPI = "https://pypi.org/simple"


class NoDistribution(LookupError):
    """The index has no file of a package that fits the requirement and the target."""


class PipIndex:
    """The real index. pip runs ``--isolated`` so that the machine's own pip configuration (extra indexes,
    find-links, constraints) cannot slip files into a kit that claims to come from ``index_url``."""

    def __init__(self, index_url: str = PYPI):
        self.index_url = index_url.rstrip("/")

    def wheel(self, requirement: str, target: Target, dest: Path) -> Path:
        """Download the wheel pip picks for ``requirement`` on ``target`` (its dependencies are not followed)."""
        platforms = [arg for tag in target.platforms() for arg in ("--platform", tag)]
        with tempfile.TemporaryDirectory(dir=dest) as scratch:
            cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--disable-pip-version-check", "--quiet",
                   "--no-deps", "--only-binary=:all:", "--index-url", self.index_url, "--implementation", "cp",
                   "--python-version", target.python, *platforms, "--dest", scratch, requirement]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if done.returncode:
                raise NoDistribution(f"pip found no wheel of {requirement!r} for {target}: {done.stderr.strip()}")
            (got,) = Path(scratch).iterdir()
            return got.rename(dest / got.name)

    def get(self, url: str) -> bytes:
        """The body at ``url`` (a simple-index page or a file)."""
        request = urllib.request.Request(url, headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.read()


@dataclass(frozen=True)
class Link:
    """One file on a simple-index page (PEP 503)."""

    filename: str
    url: str
    sha256: str
    requires_python: str


class _Anchors(HTMLParser):
    def __init__(self, base: str):
        super().__init__()
        self.base, self.links, self._open = base, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._open = dict(attrs)

    def handle_data(self, data):
        if self._open is not None and "data-yanked" not in self._open:
            url, fragment = urldefrag(urljoin(self.base, self._open.get("href", "")))
            algo, _, digest = fragment.partition("=")
            self.links.append(Link(data.strip(), url, digest if algo == "sha256" else "",
                                   self._open.get("data-requires-python") or ""))
        self._open = None


def simple_links(page: bytes, base: str) -> list[Link]:
    """The files a simple-index page offers, yanked ones left out."""
    parser = _Anchors(base)
    parser.feed(page.decode())
    return parser.links


def download_sdist(index, name: str, spec: SpecifierSet, target: Target, dest: Path) -> Path:
    """The newest sdist of ``name`` that ``spec`` and the target's Python allow, read from the simple index (pip
    cannot fetch it: preparing its metadata imports torch) and checked against the sha256 the page gives."""
    page_url = f"{index.index_url}/{canonicalize_name(name)}/"
    candidates = {}
    for link in simple_links(index.get(page_url), page_url):
        try:
            project, version = parse_sdist_filename(link.filename)
        except InvalidSdistFilename:
            continue
        python_ok = Version(f"{target.python}.0") in SpecifierSet(link.requires_python)
        if project == canonicalize_name(name) and python_ok and version in spec:
            candidates[version] = link
    if not candidates:
        raise NoDistribution(f"{page_url} has no sdist of {name}{spec} for {target}")
    link = candidates[max(candidates)]
    data = index.get(link.url)
    if not link.sha256 or hashlib.sha256(data).hexdigest() != link.sha256:
        raise NoDistribution(f"{link.url}: sha256 differs from the index's ({link.sha256 or 'none given'})")
    path = dest / link.filename
    path.write_bytes(data)
    return path
