"""prediction.margin (top-1 minus top-2 probability) with an index, so the model-uncertain queue
pages by keyset instead of ranking every prediction in Python

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 05:30:00.000000
"""

import json

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

BATCH = 5000


def _margin(probs) -> float:
    if isinstance(probs, str):
        probs = json.loads(probs)
    top = sorted((float(p) for p in (probs or {}).values()), reverse=True) + [0.0, 0.0]
    return top[0] - top[1]


def upgrade() -> None:
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.add_column(sa.Column('margin', sa.Float(), nullable=True))
    # Backfill in id order, a batch at a time (keyset, so each batch is one index range).
    conn = op.get_bind()
    pred = sa.table('prediction', sa.column('id', sa.Integer), sa.column('probs', sa.JSON),
                    sa.column('margin', sa.Float))
    last = 0
    while True:
        rows = conn.execute(sa.select(pred.c.id, pred.c.probs).where(pred.c.id > last)
                            .order_by(pred.c.id).limit(BATCH)).all()
        if not rows:
            break
        conn.execute(pred.update().where(pred.c.id == sa.bindparam('pid')).values(margin=sa.bindparam('m')),
                     [{'pid': i, 'm': _margin(p)} for i, p in rows])
        last = rows[-1][0]
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.create_index('ix_prediction_checkpoint_margin', ['checkpoint_id', 'margin', 'image_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_index('ix_prediction_checkpoint_margin')
        batch_op.drop_column('margin')
