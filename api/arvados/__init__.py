"""The Arvados side: the container API client (HTTP and in-process), the dev API server and its SQLite store."""
