-- The document store's JSONB backend, made to answer like MongoDB (schemas/mongo.py has
-- MongoDB's side): times inside documents, the natural keys, and device locations.

-- Times inside documents are ISO-8601 text that always carries its UTC offset (the store
-- writes naive datetimes as UTC), so reading them as timestamptz does not depend on the
-- session's TimeZone: immutable for every value the store writes, which is what lets
-- an index hold it. `created_at` is what retention and "newest first" go by.
CREATE OR REPLACE FUNCTION iotflow_doc_time(value text) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT
    AS $$ SELECT value::timestamptz $$;

DROP INDEX IF EXISTS documents_created;  -- the row's insert time: not the document's own
CREATE INDEX IF NOT EXISTS documents_doc_created
    ON documents (collection, iotflow_doc_time(doc->>'created_at'));

-- One document per natural key, as MongoDB's unique indexes of the same names.
CREATE UNIQUE INDEX IF NOT EXISTS documents_analytics_report ON documents
    ((doc->>'report_type'), (doc->>'device_id'), (doc#>>'{period,start}'), (doc#>>'{period,end}'))
    WHERE collection = 'analytics';
CREATE UNIQUE INDEX IF NOT EXISTS documents_user_preferences_user ON documents ((doc->>'user_id'))
    WHERE collection = 'user_preferences';
CREATE UNIQUE INDEX IF NOT EXISTS documents_device_metadata_device ON documents ((doc->>'device_id'))
    WHERE collection = 'device_metadata';

-- `devices near`: a bounding box on latitude then longitude (MongoDB has a 2dsphere index).
CREATE INDEX IF NOT EXISTS documents_location ON documents
    (collection, ((doc#>>'{location,coordinates,1}')::float8), ((doc#>>'{location,coordinates,0}')::float8));
