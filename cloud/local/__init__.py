"""The local driver: VMs as process trees on this host, each with its own SSH server, running the runner."""
