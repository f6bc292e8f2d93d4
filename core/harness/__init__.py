"""Drives a running suite from the outside, for bench/ and tests/ alike: process inspection and a streaming load.
Never imported by the servers."""
