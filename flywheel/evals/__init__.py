"""flywheel.evals"""
