"""Operational helpers: running psky's backing services (embedded Redis and PostgreSQL)."""
