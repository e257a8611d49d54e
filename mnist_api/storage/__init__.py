"""The SQL database: engine and migration entry point (`python -m mnist_api.db upgrade`),
the table definitions and the Alembic migrations.
"""
