-- Crash resume. Each secure summation in flight, as its open stage began
-- (bincode 2 of the server machine and the step it hands out): a restarted
-- coordinator continues it instead of failing the job. Deleted with the
-- round (or the job) it belongs to.
CREATE TABLE secure_sessions (
    job_id   INTEGER NOT NULL REFERENCES jobs(id),
    round    INTEGER NOT NULL,
    snapshot BLOB    NOT NULL,
    PRIMARY KEY (job_id, round)
);

-- What the job's strategy carries to its next round (a server optimiser's
-- moments), stored with each round.
ALTER TABLE jobs ADD COLUMN strategy_state BLOB;

-- The session id each site's daemon last sent (it draws one when it
-- starts): a coordinator restarted mid-summation recognises a site that
-- restarted while it was down, and drops it from the summation it resumes.
ALTER TABLE sites ADD COLUMN session TEXT NOT NULL DEFAULT '';

