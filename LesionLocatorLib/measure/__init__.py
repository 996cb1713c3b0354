"""Measurements on masks: RECIST geometry, the longitudinal report, metrics and evaluation."""
