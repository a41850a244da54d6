"""Alerting: rules evaluated on what the collector ingests and sees, notifiers, the outbox."""
