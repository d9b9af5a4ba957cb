-- Rounds made from a capture (python -m app replay) say so and name it; listeners a replay
-- inferred from the host's answers (no scanner saw them) are marked.
ALTER TABLE rounds ADD COLUMN replayed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rounds ADD COLUMN capture TEXT;
ALTER TABLE rounds_ports ADD COLUMN inferred INTEGER NOT NULL DEFAULT 0;
