"""Operator tools: what an administrator runs around a deployment (certificates), never the
daemon or the jobs, and not the development tooling of worker/tools."""
