"""Acceleration: shortcuts through MLflow's tables and trials trained as one stacked model.

Each is a faster way to do what the core already does through public APIs, and falls back on its
own where it does not apply (another store, an untested release, a config it cannot stack). Who
may import it: tests/test_architecture.py.
"""
