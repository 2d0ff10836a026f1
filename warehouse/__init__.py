"""Everything about the database: URL resolution, the embedded server, engine and
sessions, SQLAlchemy models, bulk COPY writers and schema checks.

This package imports none of ``ingest``, ``analysis`` or ``cli``.
"""
