"""Drives a running suite from the outside, for bench/, tests/ and the start scripts: process inspection, a
streaming load, waiting for the warm pool. Never imported by the servers."""
