-- Device API keys (docs/api.md): only the SHA-256 of a key is kept; NULL is no key (never
-- issued, or revoked). A key is 32 random bytes, so a fast hash is as safe as a slow one.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS api_key_sha256 bytea UNIQUE;
