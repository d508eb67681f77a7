-- The participant version each site last reported (its heartbeat carries
-- it), for `tessera sites`.
ALTER TABLE sites ADD COLUMN version TEXT NOT NULL DEFAULT '';
