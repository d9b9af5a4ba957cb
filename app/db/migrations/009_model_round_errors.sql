-- The model's error per judged round (max and median over ports) with the model version and
-- threshold in force: the report draws error over time against the threshold history.
CREATE TABLE IF NOT EXISTS model_round_errors (
    round_id      INTEGER PRIMARY KEY REFERENCES rounds(id) ON DELETE CASCADE,
    evaluation_id INTEGER NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    model_version INTEGER NOT NULL,
    threshold     REAL,                      -- the judging model's threshold (NULL: infinite, it cannot alert)
    max_error     REAL NOT NULL,             -- largest judged per-round error over the ports
    median_error  REAL NOT NULL,             -- median over the ports
    ports         INTEGER NOT NULL           -- ports judged in the round
);
CREATE INDEX IF NOT EXISTS model_round_errors_eval ON model_round_errors(evaluation_id);
