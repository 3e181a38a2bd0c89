"""forecast history: observed load per window, forecasts per lead with upper bounds and notes

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('observed_load',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('window_s', sa.Float(), nullable=False),
    sa.Column('avg', sa.Float(), nullable=False),
    sa.Column('peak', sa.Float(), nullable=False),
    sa.Column('arrivals', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(['model'], ['models.slug'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_observed_load_model_window', 'observed_load', ['model', 'window_start'], unique=True)
    op.drop_index('ix_forecasts_model_window', table_name='forecasts')
    op.add_column('forecasts', sa.Column('lead', sa.Integer(), server_default='1', nullable=False))
    op.add_column('forecasts', sa.Column('method_avg', sa.String(length=64), nullable=True))
    op.add_column('forecasts', sa.Column('predicted_avg_upper', sa.Float(), nullable=True))
    op.add_column('forecasts', sa.Column('note', sa.String(length=255), nullable=True))
    op.create_index('ix_forecasts_model_window_lead', 'forecasts', ['model', 'window_start', 'lead'], unique=True)


def downgrade() -> None:
    op.drop_index('ix_forecasts_model_window_lead', table_name='forecasts')
    op.drop_column('forecasts', 'note')
    op.drop_column('forecasts', 'predicted_avg_upper')
    op.drop_column('forecasts', 'method_avg')
    op.drop_column('forecasts', 'lead')
    op.create_index('ix_forecasts_model_window', 'forecasts', ['model', 'window_start'], unique=True)
    op.drop_table('observed_load')
