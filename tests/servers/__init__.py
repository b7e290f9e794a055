"""Test-server kit for mailhost: a throwaway PKI, a private Dovecot (IMAP/POP3)
instance and an aiosmtpd-based SMTP server, plus pytest fixtures for them.

Modules: :mod:`.certs`, :mod:`.dovecot`, :mod:`.smtpd`, :mod:`.scripted_smtp` (an SMTP
responder that says what a test tells it to, where aiosmtpd cannot misbehave), :mod:`.graph`
(a Microsoft Graph v1.0 stand-in), :mod:`.fixtures`.
"""
