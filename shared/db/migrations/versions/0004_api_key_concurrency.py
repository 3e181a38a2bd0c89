"""api keys: an optional per-key limit of requests in flight

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('max_concurrency', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('api_keys', 'max_concurrency')
