"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('certificates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('alias', sa.String(length=200), nullable=True),
    sa.Column('subject', sa.String(length=1000), nullable=False),
    sa.Column('issuer', sa.String(length=1000), nullable=False),
    sa.Column('serial', sa.String(length=100), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cert_pem', sa.LargeBinary(), nullable=False),
    sa.Column('key_enc', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_certificates')),
    sa.UniqueConstraint('name', name=op.f('uq_certificates_name'))
    )
    op.create_table('oauth_credentials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('provider', sa.String(length=100), nullable=False),
    sa.Column('client_id', sa.String(length=500), nullable=False),
    sa.Column('client_secret_enc', sa.LargeBinary(), nullable=True),
    sa.Column('tenant', sa.String(length=200), nullable=True),
    sa.Column('authority', sa.String(length=1000), nullable=True),
    sa.Column('authorization_endpoint', sa.String(length=1000), nullable=True),
    sa.Column('token_endpoint', sa.String(length=1000), nullable=True),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('flow', sa.String(length=50), nullable=False),
    sa.Column('ca_file', sa.String(length=1000), nullable=True),
    sa.Column('tokens_enc', sa.LargeBinary(), nullable=True),
    sa.Column('token_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_refresh_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_oauth_credentials')),
    sa.UniqueConstraint('name', name=op.f('uq_oauth_credentials_name'))
    )
    op.create_table('incoming_connections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('protocol', sa.String(length=100), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('encryption', sa.String(length=20), nullable=False),
    sa.Column('username', sa.String(length=500), nullable=True),
    sa.Column('password_enc', sa.LargeBinary(), nullable=True),
    sa.Column('folder', sa.String(length=1000), nullable=True),
    sa.Column('interval', sa.Integer(), nullable=False),
    sa.Column('timeout', sa.Integer(), nullable=False),
    sa.Column('after_download', sa.String(length=100), nullable=False),
    sa.Column('after_download_argument', sa.String(length=1000), nullable=True),
    sa.Column('shared_mailbox', sa.String(length=500), nullable=True),
    sa.Column('oauth_credential_id', sa.Integer(), nullable=True),
    sa.Column('host_override', sa.String(length=100), nullable=True),
    sa.Column('ca_file', sa.String(length=1000), nullable=True),
    sa.Column('options', sa.JSON(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('next_poll_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_poll_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['oauth_credential_id'], ['oauth_credentials.id'], name=op.f('fk_incoming_connections_oauth_credential_id_oauth_credentials'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_incoming_connections')),
    sa.UniqueConstraint('name', name=op.f('uq_incoming_connections_name'))
    )
    op.create_table('outgoing_connections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('protocol', sa.String(length=100), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('encryption', sa.String(length=20), nullable=False),
    sa.Column('from_address', sa.String(length=500), nullable=True),
    sa.Column('prefix', sa.String(length=500), nullable=True),
    sa.Column('username', sa.String(length=500), nullable=True),
    sa.Column('password_enc', sa.LargeBinary(), nullable=True),
    sa.Column('timeout', sa.Integer(), nullable=False),
    sa.Column('size_limit', sa.Integer(), nullable=False),
    sa.Column('debug', sa.Boolean(), nullable=False),
    sa.Column('fallback_to_default', sa.Boolean(), nullable=False),
    sa.Column('is_default', sa.Boolean(), nullable=False),
    sa.Column('oauth_credential_id', sa.Integer(), nullable=True),
    sa.Column('host_override', sa.String(length=100), nullable=True),
    sa.Column('ca_file', sa.String(length=1000), nullable=True),
    sa.Column('options', sa.JSON(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['oauth_credential_id'], ['oauth_credentials.id'], name=op.f('fk_outgoing_connections_oauth_credential_id_oauth_credentials'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outgoing_connections')),
    sa.UniqueConstraint('name', name=op.f('uq_outgoing_connections_name'))
    )
    with op.batch_alter_table('outgoing_connections', schema=None) as batch_op:
        batch_op.create_index('uq_outgoing_connections_default', ['is_default'], unique=True, sqlite_where=sa.text('is_default'), postgresql_where=sa.text('is_default'))

    op.create_table('folder_cursors',
    sa.Column('connection_id', sa.Integer(), nullable=False),
    sa.Column('folder', sa.String(length=1000), nullable=False),
    sa.Column('state', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['connection_id'], ['incoming_connections.id'], name=op.f('fk_folder_cursors_connection_id_incoming_connections'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('connection_id', 'folder', name=op.f('pk_folder_cursors'))
    )
    op.create_table('incoming_connection_certificates',
    sa.Column('connection_id', sa.Integer(), nullable=False),
    sa.Column('certificate_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['certificate_id'], ['certificates.id'], name=op.f('fk_incoming_connection_certificates_certificate_id_certificates'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['connection_id'], ['incoming_connections.id'], name=op.f('fk_incoming_connection_certificates_connection_id_incoming_connections'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('connection_id', 'certificate_id', name=op.f('pk_incoming_connection_certificates'))
    )
    op.create_table('incoming_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('connection_id', sa.Integer(), nullable=True),
    sa.Column('connection_name', sa.String(length=200), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('listed', sa.Integer(), nullable=False),
    sa.Column('stored', sa.Integer(), nullable=False),
    sa.Column('duplicates', sa.Integer(), nullable=False),
    sa.Column('acknowledged', sa.Integer(), nullable=False),
    sa.Column('bytes', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['connection_id'], ['incoming_connections.id'], name=op.f('fk_incoming_log_connection_id_incoming_connections'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_incoming_log'))
    )
    with op.batch_alter_table('incoming_log', schema=None) as batch_op:
        batch_op.create_index('ix_incoming_log_started_at', ['started_at'], unique=False)

    op.create_table('incoming_queue',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('connection_id', sa.Integer(), nullable=True),
    sa.Column('connection_name', sa.String(length=200), nullable=False),
    sa.Column('folder', sa.String(length=1000), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('message_id', sa.String(length=1000), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('from_addr', sa.Text(), nullable=True),
    sa.Column('to_addr', sa.Text(), nullable=True),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('decrypted', sa.LargeBinary(), nullable=True),
    sa.Column('decryption', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['connection_id'], ['incoming_connections.id'], name=op.f('fk_incoming_queue_connection_id_incoming_connections'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_incoming_queue'))
    )
    with op.batch_alter_table('incoming_queue', schema=None) as batch_op:
        batch_op.create_index('ix_incoming_queue_connection_status', ['connection_id', 'status'], unique=False)
        batch_op.create_index('ix_incoming_queue_created_at', ['created_at'], unique=False)

    op.create_table('outgoing_queue',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('connection_id', sa.Integer(), nullable=True),
    sa.Column('connection_name', sa.String(length=200), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('message_id', sa.String(length=1000), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('from_addr', sa.Text(), nullable=True),
    sa.Column('to_addr', sa.Text(), nullable=True),
    sa.Column('recipients', sa.JSON(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sent_via', sa.String(length=200), nullable=True),
    sa.Column('fell_back', sa.Boolean(), nullable=False),
    sa.Column('refused', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['connection_id'], ['outgoing_connections.id'], name=op.f('fk_outgoing_queue_connection_id_outgoing_connections'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outgoing_queue'))
    )
    with op.batch_alter_table('outgoing_queue', schema=None) as batch_op:
        batch_op.create_index('ix_outgoing_queue_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_outgoing_queue_due', ['status', 'next_attempt_at'], unique=False)

    op.create_table('incoming_log_entries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('log_id', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('message_id', sa.String(length=1000), nullable=True),
    sa.Column('from_addr', sa.Text(), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('result', sa.String(length=20), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['item_id'], ['incoming_queue.id'], name=op.f('fk_incoming_log_entries_item_id_incoming_queue'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['log_id'], ['incoming_log.id'], name=op.f('fk_incoming_log_entries_log_id_incoming_log'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_incoming_log_entries'))
    )
    with op.batch_alter_table('incoming_log_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_incoming_log_entries_log_id'), ['log_id'], unique=False)

    op.create_table('incoming_seen',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('connection_id', sa.Integer(), nullable=False),
    sa.Column('folder', sa.String(length=1000), nullable=False),
    sa.Column('key', sa.String(length=500), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=True),
    sa.Column('acknowledged', sa.Boolean(), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['connection_id'], ['incoming_connections.id'], name=op.f('fk_incoming_seen_connection_id_incoming_connections'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['item_id'], ['incoming_queue.id'], name=op.f('fk_incoming_seen_item_id_incoming_queue'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_incoming_seen')),
    sa.UniqueConstraint('connection_id', 'folder', 'key', name=op.f('uq_incoming_seen_connection_id_folder_key'))
    )
    with op.batch_alter_table('incoming_seen', schema=None) as batch_op:
        batch_op.create_index('ix_incoming_seen_fingerprint', ['connection_id', 'folder', 'fingerprint'], unique=False)
        batch_op.create_index('ix_incoming_seen_unacknowledged', ['connection_id', 'folder', 'acknowledged'], unique=False)

    op.create_table('outgoing_attempts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('connection_name', sa.String(length=200), nullable=True),
    sa.Column('result', sa.String(length=20), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('refused', sa.JSON(), nullable=True),
    sa.Column('duration_ms', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['item_id'], ['outgoing_queue.id'], name=op.f('fk_outgoing_attempts_item_id_outgoing_queue'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outgoing_attempts'))
    )
    with op.batch_alter_table('outgoing_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outgoing_attempts_item_id'), ['item_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('outgoing_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outgoing_attempts_item_id'))

    op.drop_table('outgoing_attempts')
    with op.batch_alter_table('incoming_seen', schema=None) as batch_op:
        batch_op.drop_index('ix_incoming_seen_unacknowledged')
        batch_op.drop_index('ix_incoming_seen_fingerprint')

    op.drop_table('incoming_seen')
    with op.batch_alter_table('incoming_log_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_incoming_log_entries_log_id'))

    op.drop_table('incoming_log_entries')
    with op.batch_alter_table('outgoing_queue', schema=None) as batch_op:
        batch_op.drop_index('ix_outgoing_queue_due')
        batch_op.drop_index('ix_outgoing_queue_created_at')

    op.drop_table('outgoing_queue')
    with op.batch_alter_table('incoming_queue', schema=None) as batch_op:
        batch_op.drop_index('ix_incoming_queue_created_at')
        batch_op.drop_index('ix_incoming_queue_connection_status')

    op.drop_table('incoming_queue')
    with op.batch_alter_table('incoming_log', schema=None) as batch_op:
        batch_op.drop_index('ix_incoming_log_started_at')

    op.drop_table('incoming_log')
    op.drop_table('incoming_connection_certificates')
    op.drop_table('folder_cursors')
    with op.batch_alter_table('outgoing_connections', schema=None) as batch_op:
        batch_op.drop_index('uq_outgoing_connections_default', sqlite_where=sa.text('is_default'), postgresql_where=sa.text('is_default'))

    op.drop_table('outgoing_connections')
    op.drop_table('incoming_connections')
    op.drop_table('oauth_credentials')
    op.drop_table('certificates')
