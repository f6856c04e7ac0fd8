"""Storage writers: each takes a committed-or-not batch and returns only once it is durable."""
