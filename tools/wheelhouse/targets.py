"""The targets a wheelhouse is made for: a (Python, torch, CUDA major) image, the versions known to work together
on it, and its platform as pip's tags and the environment markers of ``Requires-Dist`` see it."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from packaging.utils import canonicalize_name

IMAGES = Path(__file__).parent / "images"

# Built against one torch: a kit that replaced one of these would be for another target, so a requirement the
# image's version fails is an error rather than a replacement shipped in the kit.
FROZEN = frozenset({"torch", "torchvision", "torchaudio", "triton"})

# Packages that have no wheels on PyPI, so the kit carries their sdist and install.sh builds it on the target
# (without build isolation: there is no index there to make one from), mapped to what that build imports.
# transformer-engine-torch: its pyproject names setuptools>=61.0, pip and torch; its setup.py also imports
# wheel.bdist_wheel, and torch's cpp_extension compiles the ~28 files in parallel (MAX_JOBS) only with ninja.
BUILT_FROM_SDIST = {
    "transformer-engine-torch": ("setuptools>=61.0", "wheel", "ninja"),
}


@dataclass(frozen=True)
class Target:
    """The image a kit installs into. ``glibc`` is the oldest glibc of the machines it is for, which bounds the
    manylinux wheels pip may pick; None takes the known image's (``with_image_glibc``)."""

    python: str
    torch: str
    cuda: str
    glibc: str | None = None
    arch: str = "x86_64"

    def __str__(self) -> str:
        return f"python {self.python} / torch {self.torch} / cuda {self.cuda}"

    @property
    def key(self) -> tuple[str, str, str]:
        """What the table of known targets is keyed by (the platform is not part of the pins)."""
        return (self.python, self.torch, self.cuda)

    def platforms(self) -> list[str]:
        """pip's ``--platform`` values for this glibc: pip matches each ``manylinux_2_N`` exactly, so every N
        from this glibc down to 2.17 is named, and the legacy aliases of 2.17 / 2.12 / 2.5 after them."""
        newest = int(self.glibc.split(".")[1])
        tags = [f"manylinux_2_{n}_{self.arch}" for n in range(newest, 16, -1)]
        return tags + [f"manylinux2014_{self.arch}", f"manylinux2010_{self.arch}", f"manylinux1_{self.arch}"]

    def markers(self) -> dict[str, str]:
        """The environment ``Requires-Dist`` markers are evaluated in (``extra`` is added per requirement)."""
        full = f"{self.python}.0"
        return {
            "implementation_name": "cpython", "implementation_version": full, "os_name": "posix",
            "platform_machine": self.arch, "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "", "python_full_version": full,
            "python_version": self.python, "sys_platform": "linux",
        }


@dataclass(frozen=True)
class KnownTarget:
    """Versions checked to work together on a target, and the image's package list used without ``--have``."""

    pins: tuple[str, ...]
    image: Path
    glibc: str


KNOWN_TARGETS = {
    # The H100 / H200 image: Python 3.12, torch 2.11.0+cu130, glibc 2.39.
    ("3.12", "2.11", "13"): KnownTarget(
        pins=(
            # The newest TE whose transformer-engine-cu13 core wheel (181 MiB) imports against torch 2.11's
            # cuBLAS 13.0: 2.13 and later need cuBLAS >= 13.2. transformer-engine-torch is an sdist only.
            "transformer-engine==2.12.0",
            "transformer-engine-cu13==2.12.0",
            "transformer-engine-torch==2.12.0",
            # The newest vLLM whose wheel pins torch==2.11.0 (0.27 and later pin torch 2.13).
            "vllm==0.26.0",
            # What CI tests (requirements/ci-constraints.txt); it needs torch >= 2.8.
            "nvidia-modelopt==0.47.0",
            # megatron-core's newest release: what CI's second venv tests (make test-mcore-latest) and what
            # ran on an H100 of this image (docs/benchmarks.md).
            "megatron-core==0.19.2",
        ),
        image=IMAGES / "h100-py3.12-torch2.11-cu13.txt",
        # Ubuntu 24.04. vLLM 0.26's own needs reach manylinux_2_31 (llguidance 1.7).
        glibc="2.39",
    ),
}


class UnknownTarget(ValueError):
    """No pins are known for the target; guessing versions is what this tool exists to avoid."""


def known_target(target: Target) -> KnownTarget:
    """The pins for ``target``, or UnknownTarget naming the targets that have them."""
    try:
        return KNOWN_TARGETS[target.key]
    except KeyError:
        known = "; ".join(str(Target(*key)) for key in KNOWN_TARGETS)
        raise UnknownTarget(f"no known-good versions for {target}. Known targets: {known}. Add a row to "
                            "KNOWN_TARGETS in tools/wheelhouse/targets.py once a set has been checked there.") from None


def with_image_glibc(target: Target) -> Target:
    """``target`` with the known image's glibc when none was given."""
    return target if target.glibc else replace(target, glibc=known_target(target).glibc)


def sdist_requires(name: str, requires: list[str], target: Target) -> list[str]:
    """An sdist's ``Requires-Dist`` as its build on ``target`` will declare them. transformer-engine-torch's
    PKG-INFO was made on a CUDA 12 machine and names transformer_engine_cu12; its setup.py requires the core
    wheel for the CUDA major of the torch it is built against."""
    if canonicalize_name(name) != "transformer-engine-torch":
        return requires
    return [re.sub(r"^transformer[-_.]engine[-_.]cu\d+", f"transformer_engine_cu{target.cuda}", r) for r in requires]
