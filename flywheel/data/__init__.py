"""flywheel.data"""
