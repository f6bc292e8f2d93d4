"""The model host: one process that owns every runner (vLLM's OpenAI server, one per engine setting) for the
three fronts, and leases experts to them over a unix socket.

`protocol` is what both sides share; everything else here is the host's own implementation.
"""
