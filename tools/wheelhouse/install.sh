#!/usr/bin/env bash
# Installs this wheelhouse kit with no package index: joins split files, checks SHA256SUMS, installs the
# wheels, then builds the sdists (Transformer Engine's torch extension) against the torch already installed.
#   bash install.sh                                    # into the python3 on PATH
#   PYTHON=/opt/venv/bin/python MAX_JOBS=32 bash install.sh
set -euo pipefail
shopt -s nullglob
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
# Part numbers are zero-padded to one width, so a byte-order glob lists them in order.
export LC_ALL=C

# Files cut by --split-mib lie here as NAME.part00, NAME.part01, ...; a whole file is written under a
# temporary name first, so one that exists was joined completely (by an earlier run, or for another part).
for part in *.part[0-9]*; do
    whole=${part%.part*}
    [[ -e $whole ]] && continue
    cat -- "$whole".part[0-9]* >"$whole.joining"
    mv -- "$whole.joining" "$whole"
done
sha256sum --check --quiet SHA256SUMS

# A kit fits one Python / torch / CUDA major: refuse another before changing anything.
"$PYTHON" - <<'EOF'
import json
import sys

import torch

want = json.load(open("manifest.json"))["target"]
want = (want["python"], want["torch"], want["cuda"])
have = ("%d.%d" % sys.version_info[:2], ".".join(torch.__version__.split(".")[:2]),
        (torch.version.cuda or "none").split(".")[0])
if have != want:
    sys.exit("install.sh: this kit is for python %s / torch %s / cuda %s; %s has python %s / torch %s / cuda %s"
             % (*want, sys.executable, *have))
EOF

# All wheels in one call, so pip checks them against each other and against what is installed.
wheels=(./*.whl)
if ((${#wheels[@]})); then
    "$PYTHON" -m pip install --no-index --find-links . "${wheels[@]}"
fi

# Transformer Engine's torch extension is an sdist only: C++ compiled by g++ (no nvcc), MAX_JOBS files at a time.
# NVTE_PYTORCH_FORCE_BUILD stops its setup.py trying to download a prebuilt wheel, NVTE_FRAMEWORK stops it
# looking for JAX. cudnn.h and nccl.h come from the nvidia-cudnn / nvidia-nccl wheels (nvidia/*/include), which
# are not on the compiler's path. No build isolation: it must build against the torch installed here.
sdists=(./*.tar.gz)
if ((${#sdists[@]})); then
    includes=$("$PYTHON" - <<'EOF'
import glob
import importlib.util
import os

spec = importlib.util.find_spec("nvidia")
roots = spec.submodule_search_locations if spec else []
print(os.pathsep.join(sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "include")))))
EOF
    )
    NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} \
        CPLUS_INCLUDE_PATH="$includes${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}" \
        "$PYTHON" -m pip install --no-index --find-links . --no-build-isolation "${sdists[@]}"
fi

if grep -q '^transformer-engine-torch==' requirements.lock; then
    "$PYTHON" -c "import transformer_engine.pytorch"
    echo "install.sh: transformer_engine.pytorch imports"
fi
# A package the kit replaced (manifest.json: "replaces") may leave another of the image's unsatisfied: say so.
"$PYTHON" -m pip check || echo "install.sh: pip check reports the conflicts above" >&2
