"""The kernel side seen from user space: the one mirror of bpf/common.h (bpf_structs), pinned maps
(maps), the loader and its fail-closed steps (xdp, xdp_steps), the TC egress attachment (egress), the
pin record (pin_owner), the SYN limit (synlimit), and the programs built with nothing attached
(xdp_unattached) that a replay runs packets through (prog_run). Imports shared leaves and app.db only."""
