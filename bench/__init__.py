"""Benchmarks: each system runs in its own process; tables print ratios against a baseline
measured in the same invocation. ``python -m bench all`` (or ``train``, ``translate``, ``serve``,
``export``)."""
