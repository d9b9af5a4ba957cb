"""The kernel side seen from user space: the one mirror of bpf/common.h (bpf_structs), pinned maps
(maps), the loader and its fail-closed steps (xdp, xdp_steps), the TC egress attachment (egress), the
pin record (pin_owner) and the SYN limit (synlimit). Imports shared leaves and app.db only."""
