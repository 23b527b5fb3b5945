"""Evaluation: sampling from trained policies, judges, win-rate metrics and the actor pool."""
