-- Plausible value ranges per datapoint (docs/decoding.md): a message with a reading
-- outside its datapoint's range is a dead letter (`out_of_range`), not rows. NULL leaves
-- that side open; both NULL (the default) checks nothing.
ALTER TABLE datapoints
    ADD COLUMN IF NOT EXISTS min_value double precision,
    ADD COLUMN IF NOT EXISTS max_value double precision;

-- A NaN bound compares false with every value and an infinite one bounds nothing:
-- refuse both, and an empty range, where they are typed rather than at decode time.
ALTER TABLE datapoints DROP CONSTRAINT IF EXISTS datapoints_range_valid;
ALTER TABLE datapoints ADD CONSTRAINT datapoints_range_valid CHECK (
    abs(min_value) < 'Infinity'::double precision
    AND abs(max_value) < 'Infinity'::double precision
    AND min_value <= max_value
);
