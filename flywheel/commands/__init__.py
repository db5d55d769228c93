"""CLI command groups, one module per concern; `flywheel.cli` registers them."""
