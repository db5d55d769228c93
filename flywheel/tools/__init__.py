"""flywheel.tools"""
