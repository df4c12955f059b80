"""The CPU thread policy: OpenMP threads that spin briefly at a barrier, then sleep.

torch's OpenMP threads (GNU libgomp) busy-wait ~300,000 iterations at every barrier by default. On a machine
where another process is busy, one descheduled thread stalls its partners at every small GEMM: a 2-core demo
step ran 4-16x slower beside one busy process. A short spin (GOMP_SPINCOUNT) keeps the quiet speed within ~10%
and keeps over half of it under such load (the README's performance section has the figures). Numerics do not
change. The runtime reads the variable once, when torch loads it, so it is set when harmodt_fast is imported
before torch (the CLI, the demo and their worker processes always are); a user's own OMP_WAIT_POLICY or
GOMP_SPINCOUNT wins. Torch-free on purpose.
"""
from __future__ import annotations

import os
import sys

SPIN_COUNT = 2000  # iterations an idle OpenMP thread spins before it sleeps (libgomp's default: 300,000)


def apply_cpu_wait_policy() -> bool:
    """Sets GOMP_SPINCOUNT=SPIN_COUNT unless a wait policy is set or torch is loaded already; whether it did."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
