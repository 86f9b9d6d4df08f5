"""Ray Serve deployments wrapping the model backends of `models/`."""
