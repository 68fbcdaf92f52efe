"""Command-line tools that are not pipeline stages (the learning-rate demo)."""
