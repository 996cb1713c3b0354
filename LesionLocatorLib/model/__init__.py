"""Model weights and what runs them: checkpoints, plans, networks, devices, preprocessing, resampling, tiles."""
