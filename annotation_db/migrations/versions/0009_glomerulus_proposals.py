"""glomerulus_proposal: glomeruli a detector found on a slide, proposed / accepted / rejected

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 23:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'glomerulus_proposal',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('slide_id', sa.Integer(), nullable=False),
        sa.Column('dataset_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('source', sa.String(length=300), nullable=False),
        sa.Column('checkpoint_sha256', sa.String(length=64), nullable=False),
        sa.Column('score', sa.Float(), nullable=False),
        sa.Column('polygon', sa.JSON(), nullable=False),
        sa.Column('x0', sa.Integer(), nullable=False),
        sa.Column('y0', sa.Integer(), nullable=False),
        sa.Column('box_w', sa.Integer(), nullable=False),
        sa.Column('box_h', sa.Integer(), nullable=False),
        sa.Column('area_um2', sa.Float(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reviewed_by', sa.String(length=200), nullable=True),
        sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('slide_box_id', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['slide_id'], ['slide.id'], name=op.f('fk_glomerulus_proposal_slide_id_slide'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['dataset_id'], ['dataset.id'],
                                name=op.f('fk_glomerulus_proposal_dataset_id_dataset'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['slide_box_id'], ['slide_box.id'],
                                name=op.f('fk_glomerulus_proposal_slide_box_id_slide_box'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_glomerulus_proposal')),
    )
    op.create_index('ix_glomerulus_proposal_slide_dataset_status', 'glomerulus_proposal',
                    ['slide_id', 'dataset_id', 'status'])


def downgrade() -> None:
    op.drop_index('ix_glomerulus_proposal_slide_dataset_status', table_name='glomerulus_proposal')
    op.drop_table('glomerulus_proposal')
