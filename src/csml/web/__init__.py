"""The web pages: the user page at `/` and the operator page at `/operator`."""
