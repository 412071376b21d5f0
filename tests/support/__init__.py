"""What the tests share, in layers: processes to start (server, redis, processes), clients
on them (workers, messages, api), waiting on a condition (waiting), and bytes made by hand
(wire). Every test module imports from here, never from another test module;
tests/conftest.py turns these into pytest fixtures.

Nothing is imported here: wire.py serves fuzz/ in a venv without the tests' dependencies.
"""
