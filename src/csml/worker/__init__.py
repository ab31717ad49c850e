"""The worker: serves one application, pulling jobs from the coordinator over HTTP."""
