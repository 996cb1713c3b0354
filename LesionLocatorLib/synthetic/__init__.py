"""Synthetic data made by the project's own code: phantoms and follow-ups."""
