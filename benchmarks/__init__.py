"""Benchmarks comparing Imagine with LUCIR, iCaRL and the bounds."""
