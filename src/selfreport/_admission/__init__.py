"""Admission: the cheap decision whether a captured error becomes an event (dedupe, rate limit)."""
