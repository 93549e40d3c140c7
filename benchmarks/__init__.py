"""MixT5 benchmarks: `python -m benchmarks [layer] [step] [generate] [upcycle] [flags]` (docs/benchmarks.md).

Each benchmark times its cases side by side in one process, interleaved round by round, and reports medians and
ratios; `run.py` prints the tables and writes everything to one JSON file.
"""
