"""Decoding: topics and payloads into readings, or a reason to reject them."""
