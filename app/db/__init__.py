"""All SQL: the connection (WAL, pragmas, numbered migrations) and one module of queries per table group.
Imported by services, commands and the demo; imports nothing of portwatch but app.errors."""
