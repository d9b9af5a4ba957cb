"""One round of one interface into SQLite: the round (collector), counter deltas (rounds), ingress and
egress rows, the port scanner, the packet sniffer, teardown (``down``), and a capture replayed as rounds
(replay, capture_file, sniffer_file). Imports kernel and leaves."""
