"""flywheel: an autonomous training manager for LLM agents in production."""

__version__ = "0.1.0"
