-- Verified peers: the proof a blind forger cannot give, and the fingerprint of the proving packet;
-- answers to this host's own conversations that passed a block, per entry and round. Two-way flows an
-- older portwatch recorded prove nothing (a forger can draw them): only sockets stay peers.
ALTER TABLE peers ADD COLUMN proof TEXT;
ALTER TABLE peers ADD COLUMN ttl INTEGER;
ALTER TABLE peers ADD COLUMN mac TEXT;
ALTER TABLE peers ADD COLUMN last_verified REAL;
UPDATE peers SET proof = 'established', last_verified = last_two_way WHERE last_evidence LIKE '%established%';
ALTER TABLE blacklist_drops ADD COLUMN replies INTEGER NOT NULL DEFAULT 0;
ALTER TABLE source_stats ADD COLUMN mac TEXT;
