-- Topics and reasons are capped like payloads (a 60,000-character topic must not store
-- 60,000 characters twice); their full lengths, in characters, are kept beside them.
ALTER TABLE dead_letters
    ADD COLUMN IF NOT EXISTS topic_size integer,
    ADD COLUMN IF NOT EXISTS reason_size integer;
