"""Benchmarks: `iotflow bench` (pipeline, with its publisher, ceiling, HTTP, TLS and Kafka
runs) and the stand-alone ones for a single part (rules, fleet, jobs, outbox, …)."""
