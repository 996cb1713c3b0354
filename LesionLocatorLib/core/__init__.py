"""Data vocabulary: image volumes and their geometry, image files, prompts, results."""
