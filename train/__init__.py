"""diffusion_engine.train: the shapes dataset, the tiny-model recipe and the committed demo checkpoint.

Importing this package imports no torch: the runtime finds the demo checkpoint through it.
"""

CHECKPOINT = "demo-checkpoint"
