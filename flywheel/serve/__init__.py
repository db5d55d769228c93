"""flywheel.serve"""
