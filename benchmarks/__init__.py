"""Side-by-side benchmarks of lacot_kernels against its peers (run with pytest, see conftest.py)."""
