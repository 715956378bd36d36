"""slide_box.polygon (a glomerulus outline, level-0 [[x, y], ...]) and slide_box.source (drawn,
proposal, import:<file>); boxes drawn by accepting a proposal get its polygon

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 01:40:00.000000
"""

import json

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('slide_box', schema=None) as batch_op:
        batch_op.add_column(sa.Column('polygon', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('source', sa.String(length=300), nullable=False, server_default='drawn'))
    # A box an acceptance drew carried its outline only through the proposal: copy it onto the box
    # (open ring, no repeated closing vertex), and say where the box came from.
    conn = op.get_bind()
    box = sa.table('slide_box', sa.column('id', sa.Integer), sa.column('polygon', sa.JSON(none_as_null=True)),
                   sa.column('source', sa.String))
    prop = sa.table('glomerulus_proposal', sa.column('slide_box_id', sa.Integer), sa.column('polygon', sa.JSON))
    rows = conn.execute(sa.select(prop.c.slide_box_id, prop.c.polygon).where(prop.c.slide_box_id.is_not(None))).all()
    for box_id, polygon in rows:
        if isinstance(polygon, str):
            polygon = json.loads(polygon)
        ring = [[float(x), float(y)] for x, y in (polygon or [])]
        if len(ring) > 1 and ring[0] == ring[-1]:
            ring = ring[:-1]
        conn.execute(sa.update(box).where(box.c.id == box_id)
                     .values(polygon=ring if len(ring) >= 3 else None, source='proposal'))


def downgrade() -> None:
    with op.batch_alter_table('slide_box', schema=None) as batch_op:
        batch_op.drop_column('source')
        batch_op.drop_column('polygon')
