"""Command-line tools that are not pipeline stages (checkpoint comparison, the learning-rate demo)."""
