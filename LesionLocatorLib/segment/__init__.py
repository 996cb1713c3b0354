"""Per-image promptable segmentation sessions."""
