"""The fronts: the three OpenAI-compatible servers (8082, 8083, 8084).

They validate, route, apply each expert's prompt and defaults, lease the expert from the model host, relay the
runner's answer, run consensus, count and limit. They import the host only through `core.host.protocol`.
"""
