"""Sweeps of a CL run: the search space, trial records, the adapter cache and the report (no Ray here)."""
