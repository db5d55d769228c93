"""flywheel.agent"""
