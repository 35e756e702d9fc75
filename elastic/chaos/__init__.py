"""Fault injection: typed faults, deterministic schedules, and tools to inject them into real runs."""
