"""annotator.role and annotator.password_hash: sign-in accounts with roles

Existing annotators become role 'annotator' without a password (they cannot sign in with a
password until an admin sets one: `glom user passwd NAME`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 20:30:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('annotator', schema=None) as batch_op:
        batch_op.add_column(sa.Column('role', sa.String(length=16), nullable=False, server_default='annotator'))
        batch_op.add_column(sa.Column('password_hash', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('annotator', schema=None) as batch_op:
        batch_op.drop_column('password_hash')
        batch_op.drop_column('role')
