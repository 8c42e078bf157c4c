"""Benchmarks (``python -m bench ingest|scale``): dealmail measured against a bare baseline in
the same run, printed as figures and ratios. Outside the layers: it may import any room, and
nothing imports it.
"""
