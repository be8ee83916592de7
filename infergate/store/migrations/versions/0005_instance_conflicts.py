"""instance conflicts

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instance_conflicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind", sa.Enum("content", "series", name="conflictkind", native_enum=False, length=16), nullable=False
        ),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_instance_conflicts_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_conflicts")),
    )
    with op.batch_alter_table("instance_conflicts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instance_conflicts_instance_id"), ["instance_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instance_conflicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_conflicts_instance_id"))
    op.drop_table("instance_conflicts")
