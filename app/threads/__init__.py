"""Threads and scheduling: the base thread (stop event, logged failures), scanner and sniffer threads,
collection runs; the work itself is in services. Imported by commands; imports services, never commands or the CLI."""
