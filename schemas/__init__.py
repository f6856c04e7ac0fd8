"""Record types shared by the worker and the jobs, and the DDL of every store."""
