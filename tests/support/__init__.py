"""Helpers shared by the test modules: small models, processes under test, browser pages, made-up search steps.

Test modules import these; fixtures live in ``tests/conftest.py``. No test module imports another.
"""
