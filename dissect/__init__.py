"""Network dissection and unit audits of vision models (``python -m dissect``).

Importing the package registers the configuration schema and its resolvers
(``dissect.settings``) with Hydra, so that ``conf/config.yaml`` composes
wherever ``dissect`` is used.
"""

from dissect import settings as _settings  # noqa: F401  (registers the schema)
