"""Storage: the model catalog and history in Postgres (SQLAlchemy 2 + psycopg 3, Alembic)."""
