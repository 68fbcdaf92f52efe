"""The pipeline stages, one module (or package) each, each with ``run(cfg) -> Path`` and ``check(cfg)``."""
