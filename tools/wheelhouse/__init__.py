"""An offline install kit ("wheelhouse") of the GPU extras for an air-gapped cluster: ``python -m tools.wheelhouse``."""
