"""Delivery: the queue, the worker, envelopes, the transport, the retry policy and the spool."""
