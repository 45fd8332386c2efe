"""The stub driver: an in-memory cloud whose VMs simulate crunch-run, on a real or fake clock."""
