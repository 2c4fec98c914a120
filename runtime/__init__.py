"""diffusion_engine.runtime."""
