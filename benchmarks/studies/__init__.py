"""Studies: questions one rate sweep does not answer, each a scenario of run.py.

One module per study (run.py's STUDIES names each scenario's function), what they share in
common.py; each module's docstring has the command that runs it. Each function takes its
options as keywords (run.py passes those given on its command line; the defaults are
there), prints what it measured, and returns it as rows for the run's JSON.
docs/benchmarks.md has the figures of their last runs.
"""
