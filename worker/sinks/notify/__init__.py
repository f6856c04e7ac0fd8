"""Alert notifications: an outbox in PostgreSQL, Alertmanager and signed webhooks (docs/rules.md).

`outbox` records what must be sent (the alert sink writes it with the alert), `channels`
knows how each receiver is spoken to, `delivery` is the actor that sends from the outbox.
"""
