"""models: an optional tool-call parser, the vLLM parser a worker uses for tool_choice "auto"

No grants: the service roles of 0005 hold table-level privileges, which cover a column added later.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('models', sa.Column('tool_parser', sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column('models', 'tool_parser')
