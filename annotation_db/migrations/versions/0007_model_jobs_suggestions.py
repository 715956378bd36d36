"""Model in the loop: training jobs, a dataset's active model and suggestion settings, and which
suggestion (if any) a label was given with

- ``job``: a training job started from the Models page or ``glom jobs``; who, when, recipe,
  overrides, status, pid, log, checkpoint and its figures (annotation_db.jobs).
- ``dataset``: ``active_checkpoint`` (path) and ``active_checkpoint_id`` (the id its predictions
  carry); ``suggestions`` off | after | before; ``blind_share`` and ``blind_seed`` of the blind
  slice that never shows a suggestion.
- ``label`` and ``label_event``: ``suggested`` (the class key shown, NULL when none was) and
  ``suggested_by`` (the checkpoint id that made it).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 23:00:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('dataset_id', sa.Integer(), nullable=False),
        sa.Column('created_by', sa.String(length=200), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('recipe', sa.Text(), nullable=False),
        sa.Column('overrides', sa.JSON(), nullable=False),
        sa.Column('label_source', sa.String(length=32), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('stage', sa.String(length=32), nullable=False, server_default=''),
        sa.Column('device', sa.String(length=32), nullable=False, server_default=''),
        sa.Column('host', sa.String(length=200), nullable=False, server_default=''),
        sa.Column('pid', sa.Integer(), nullable=True),
        sa.Column('runs_dir', sa.Text(), nullable=False),
        sa.Column('log_path', sa.Text(), nullable=False, server_default=''),
        sa.Column('run_dir', sa.Text(), nullable=False, server_default=''),
        sa.Column('checkpoint', sa.Text(), nullable=False, server_default=''),
        sa.Column('checkpoint_id', sa.String(length=200), nullable=False, server_default=''),
        sa.Column('error', sa.Text(), nullable=False, server_default=''),
        sa.Column('metrics', sa.JSON(), nullable=True),
        sa.Column('data_summary', sa.JSON(), nullable=True),
        sa.Column('predictions', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.ForeignKeyConstraint(['dataset_id'], ['dataset.id'], name=op.f('fk_job_dataset_id_dataset'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job')),
    )
    op.create_index('ix_job_status_id', 'job', ['status', 'id'], unique=False)
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.add_column(sa.Column('active_checkpoint', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('active_checkpoint_id', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('suggestions', sa.String(length=16), nullable=False, server_default='off'))
        batch_op.add_column(sa.Column('blind_share', sa.Float(), nullable=False, server_default='0.1'))
        batch_op.add_column(sa.Column('blind_seed', sa.Integer(), nullable=False, server_default='0'))
    for table in ('label', 'label_event'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('suggested', sa.String(length=200), nullable=True))
            batch_op.add_column(sa.Column('suggested_by', sa.String(length=200), nullable=True))


def downgrade() -> None:
    for table in ('label_event', 'label'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('suggested_by')
            batch_op.drop_column('suggested')
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.drop_column('blind_seed')
        batch_op.drop_column('blind_share')
        batch_op.drop_column('suggestions')
        batch_op.drop_column('active_checkpoint_id')
        batch_op.drop_column('active_checkpoint')
    op.drop_index('ix_job_status_id', table_name='job')
    op.drop_table('job')
