"""The coordinator: the HTTP API, the only owner of the store."""
