"""Test settings shared by every test module.

The suite runs tiny models on a 2-core machine, sometimes several processes at once (shared
studies): one intra-op thread per process avoids OpenMP oversubscription, which made a tiny
convolution many times slower with 2 threads while another process was busy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by worker subprocesses

import torch  # noqa: E402

torch.set_num_threads(1)
