"""Speculative Decoding Lab: an exact speculative decoder and the measurements around it.

Nothing in this package imports streamlit; the app in ``app/`` and the notebooks
in ``notebooks/`` are thin faces over it.
"""

import os as _os

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of
# spinning. On a 2-core machine shared with any other busy process, spinning
# threads fight for the cores, and torch's default two threads ran 48x slower
# (measured here: SmolLM2 at 0.51 tokens/s instead of 24.6 with this setting,
# 21.6 with one thread). It only applies if lab is imported before torch; the
# app and ``python -m lab`` do so. Set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
