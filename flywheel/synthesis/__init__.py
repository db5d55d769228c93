"""Synthesis: training samples generated on demand, scored, and let into the pool only when good.

The second engine beside capture. Generators (flywheel.synthesis.generators, a registry by name) turn
what the project already trusts (verified samples, the knowledge base, captured traffic) into new
candidate samples; the quality scorer (flywheel.synthesis.scorer) scores every one and keeps only
those above the thresholds; flywheel.synthesis.stage runs both and stores every sample with its
provenance, kept or dropped, in table `synthetic_samples`. The snapshot builder reads the kept ones
as a source of their own (flywheel.trainer.samples.synthetic_samples).
"""
