"""CPU threads per process: one setting (``threads`` / ``--threads``) for PyTorch and onnxruntime.

PyTorch and onnxruntime each default to one thread per core and spin-wait between parallel regions.
On cores shared with other processes (CI runners, several ``accelerate launch`` processes, other
jobs) those threads wait on each other while descheduled: on this project's 2-core machine, under
the load of other jobs, a KD training step took 4.6-7.2x as long with PyTorch's default of 2 threads
as with 1 (``benchmarks/threads.py``). The pipeline therefore uses ``threads`` (default 1) per
process, and a user who owns the cores raises it.
"""
from __future__ import annotations

#: threads per process unless ``threads`` / ``--threads`` says otherwise
DEFAULT_THREADS = 1


def use_threads(threads: int) -> None:
    """Set PyTorch's intra-op threads for this process (onnxruntime sessions take theirs per session)."""
    import torch

    if torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
