"""slide.patient: who a biopsy came from, for patient-grouped training splits

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 05:45:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('slide', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('slide', schema=None) as batch_op:
        batch_op.drop_column('patient')
