-- Clinical metrics of a binary classifier (ROC AUC, average precision,
-- Brier score, calibration, sensitivity/specificity/PPV at the job's
-- threshold), as the JSON of `tessera_protocol::metrics::BinaryMetrics`:
-- a site's own figures, and those pooled by secure sum (the Brier score
-- every round, the rest for the final model only).
ALTER TABLE metrics ADD COLUMN binary TEXT;
ALTER TABLE pooled_metrics ADD COLUMN binary TEXT;
