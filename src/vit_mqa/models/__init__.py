"""The network and everything that makes, loads, saves, converts or exports one."""
