"""flywheel.trainer"""
