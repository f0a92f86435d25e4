"""The lockbroker benchmark: the broker side by side with etcd's Lock service, a floor and a ceiling.

`uv run python -m bench --help`; method and results in bench/README.md. The modules the load
agent imports (agent, workloads, stats, drivers_aetcd) use only the standard library, so the same
agent runs under aetcd's own interpreter.
"""
