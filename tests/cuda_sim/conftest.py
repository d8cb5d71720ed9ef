"""The CUDA simulator tests run only in a process started with ``NUMBA_ENABLE_CUDASIM=1``
(``tests/test_cuda_sim.py`` starts one): the variable must be set before ``numba.cuda`` is
first imported, and the ordinary test process imports the real ``numba.cuda``."""

import os
import sys

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["test_*.py"]
else:
    # The simulator runs each GPU thread as a Python thread and polls them for barriers
    # while holding the GIL; a short switch interval makes barriers 3-4x faster.
    sys.setswitchinterval(5e-4)
