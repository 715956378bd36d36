"""indexes for the labeling app's queues (keyset pages by image id, an annotator's recent labels)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 02:50:00.000000
"""

from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('image', schema=None) as batch_op:
        batch_op.create_index('ix_image_dataset_id', ['dataset_id', 'id'], unique=False)
    with op.batch_alter_table('label_event', schema=None) as batch_op:
        batch_op.create_index('ix_label_event_annotator_id', ['annotator_id', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('label_event', schema=None) as batch_op:
        batch_op.drop_index('ix_label_event_annotator_id')
    with op.batch_alter_table('image', schema=None) as batch_op:
        batch_op.drop_index('ix_image_dataset_id')
