"""The Gaussian-splat avatar: a procedural head, its linear rig, rasterisers and animation."""
