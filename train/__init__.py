"""Training utilities for LesionLocator (synthetic longitudinal data, fine-tuning)."""
