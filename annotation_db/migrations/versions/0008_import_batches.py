"""import_batch, import_staged_image, import_staged_label: imports stage their rows, then publish

An import writes its rows in short transactions into the staging tables (no reader looks at them)
and publishes them into image / label / label_event in one short transaction, so a click in the
labeling app never waits for a whole import, and a failed or killed import leaves nothing behind
that anyone sees (annotation_db.staging).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 23:10:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'import_batch',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('dataset', sa.String(length=200), nullable=False),
        sa.Column('source', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('owner_host', sa.String(length=200), nullable=False),
        sa.Column('owner_pid', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_import_batch')),
    )
    op.create_table(
        'import_staged_image',
        sa.Column('batch_id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('width', sa.Integer(), nullable=False),
        sa.Column('height', sa.Integer(), nullable=False),
        sa.Column('slide', sa.String(length=300), nullable=True),
        sa.ForeignKeyConstraint(['batch_id'], ['import_batch.id'],
                                name=op.f('fk_import_staged_image_batch_id_import_batch'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id', 'seq', name=op.f('pk_import_staged_image')),
    )
    op.create_table(
        'import_staged_label',
        sa.Column('batch_id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('annotator', sa.String(length=200), nullable=False),
        sa.Column('classes', sa.JSON(), nullable=False),
        sa.Column('uncertain', sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(['batch_id'], ['import_batch.id'],
                                name=op.f('fk_import_staged_label_batch_id_import_batch'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id', 'seq', name=op.f('pk_import_staged_label')),
    )


def downgrade() -> None:
    op.drop_table('import_staged_label')
    op.drop_table('import_staged_image')
    op.drop_table('import_batch')
