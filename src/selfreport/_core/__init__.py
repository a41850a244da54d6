"""Foundations every stage uses: the reporting-path guard, diagnostics, counters, options, DSNs."""
