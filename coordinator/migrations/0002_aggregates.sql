-- The released aggregate of each secure round: the unmasked sum of the
-- survivors' inputs (little-endian u32 words), committed in the round's
-- ledger block (`aggregate_sha256`). Sites fetch it to derive the next
-- model themselves instead of trusting the one they are sent.
CREATE TABLE aggregates (
    job_id  INTEGER NOT NULL REFERENCES jobs(id),
    round   INTEGER NOT NULL,
    sha256  TEXT    NOT NULL,
    data    BLOB    NOT NULL,
    PRIMARY KEY (job_id, round)
);
