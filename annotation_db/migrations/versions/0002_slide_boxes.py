"""slide boxes drawn in the app

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 02:40:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('slide_box',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slide_id', sa.Integer(), nullable=False),
    sa.Column('x0', sa.Integer(), nullable=False),
    sa.Column('y0', sa.Integer(), nullable=False),
    sa.Column('box_w', sa.Integer(), nullable=False),
    sa.Column('box_h', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['image_id'], ['image.id'], name=op.f('fk_slide_box_image_id_image'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['slide_id'], ['slide.id'], name=op.f('fk_slide_box_slide_id_slide'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_slide_box'))
    )
    with op.batch_alter_table('slide_box', schema=None) as batch_op:
        batch_op.create_index('ix_slide_box_slide', ['slide_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('slide_box', schema=None) as batch_op:
        batch_op.drop_index('ix_slide_box_slide')

    op.drop_table('slide_box')
