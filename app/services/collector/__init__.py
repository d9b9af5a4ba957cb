"""One round of one interface into SQLite: the round (collector), counter deltas (rounds), ingress and
egress rows, the port scanner, the packet sniffer, and teardown (``down``). Imports kernel and leaves."""
