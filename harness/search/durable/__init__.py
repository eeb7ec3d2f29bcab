"""Durability: trials that survive their workers, a journal repaired after a crash, the study's
lock, the audit of the two stores, and every use of Optuna's private API. Who may import it:
tests/test_architecture.py.
"""
