"""Evaluation: independent judges."""
