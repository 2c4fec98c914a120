"""diffusion_engine.benchmarks."""
