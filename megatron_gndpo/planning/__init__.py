"""``megatron-gndpo plan``: an analytic model of a run's parameters, memory per GPU and time per step,
before anything is built.

- ``model.py``: what an architecture holds and computes (parameters per rank, FLOPs, KV cache bytes);
- ``architecture.py``: reads an architecture from a Hugging Face directory or a converted checkpoint;
- ``hardware.py``: the GPUs and the calibrated constants (MFU per phase, bandwidths);
- ``workload.py``: the layout and the step's shape the estimates are made for;
- ``memory.py`` / ``timing.py``: the estimates; ``layouts.py``: candidates, checks and ranking;
- ``report.py``: the plan as JSON and as text; ``command.py``: the subcommand.

Nothing here imports megatron or touches a device; see ``docs/planning.md``.
"""
