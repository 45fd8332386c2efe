"""Cloud drivers (stub, local, azure), the SSH executor and the Arvados container API."""
