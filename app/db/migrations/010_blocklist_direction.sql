-- The blocklist's direction: 'in' (a source, dropped in XDP) or 'out' (a destination this host
-- may not send to, dropped in TC egress: eg_block); every existing entry is inbound.
ALTER TABLE blacklist ADD COLUMN direction TEXT NOT NULL DEFAULT 'in';
