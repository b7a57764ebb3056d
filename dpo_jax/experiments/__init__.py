"""Experiments from the DPO paper, runnable offline (except the package index)."""
