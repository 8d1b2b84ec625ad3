"""The daemon as a service: its log lines, systemd notify, and the metrics endpoint."""
