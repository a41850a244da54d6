"""On-prem: forwarding destinations with their own scrubbing and spool, and StatsD metrics."""
