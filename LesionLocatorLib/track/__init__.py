"""Carrying lesions from a baseline into follow-ups: registration, propagation, the tracker."""
