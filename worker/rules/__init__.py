"""Alert rules: evaluation on the stream, alert lifecycles, notifications."""
