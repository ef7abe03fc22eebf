"""Speculative Decoding Lab: an exact speculative decoder and the measurements around it.

Nothing in this package imports streamlit; the app in ``app/`` and the notebooks
in ``notebooks/`` are thin faces over it.
"""
