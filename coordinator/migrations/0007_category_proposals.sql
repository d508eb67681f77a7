-- Each accepting site's signed category proposal for a job whose schema
-- discovers categories (protobuf `CategoryProposal`), relayed to the
-- cohort with the statistics task, also after a coordinator restart.
CREATE TABLE category_proposals (
    job_id   INTEGER NOT NULL REFERENCES jobs(id),
    site_id  TEXT    NOT NULL,
    proposal BLOB    NOT NULL,
    PRIMARY KEY (job_id, site_id)
);
