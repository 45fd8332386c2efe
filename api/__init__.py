"""The management HTTP API (Bottle on Waitress), Prometheus metrics and the admin client."""
