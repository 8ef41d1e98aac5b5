"""Helpers shared by the test folders: engine observation (idle checks, step probes) and numeric checks."""
