"""diffusion_engine.engine."""
