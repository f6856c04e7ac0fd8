"""Actor runtime: bounded mailboxes, actors, the supervisor and systemd notification."""
