"""diffusion_engine.export."""
