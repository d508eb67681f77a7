-- Why the coordinator left a site out of a job it had accepted (for
-- example: its data is encoded differently from the other sites'), so
-- that `tessera job status` can say so next to the sites' own decisions.
CREATE TABLE site_problems (
    job_id   INTEGER NOT NULL REFERENCES jobs(id),
    site_id  TEXT    NOT NULL,
    problem  TEXT    NOT NULL,
    at_ms    INTEGER NOT NULL,
    PRIMARY KEY (job_id, site_id)
);
