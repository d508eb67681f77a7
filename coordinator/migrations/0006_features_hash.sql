-- The encoding the job's sites agreed on (the features hash of the
-- consortium's schema as every kept site applied it): exported with the
-- model, so whoever scores data with it can check they encode rows alike.
ALTER TABLE jobs ADD COLUMN features_hash TEXT;
