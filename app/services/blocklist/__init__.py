"""The blocklist: decisions from findings, enforcement into the pinned maps, manual edits (blocklist)
and the allowlist. Imports evaluation's findings, the kernel and leaves."""
