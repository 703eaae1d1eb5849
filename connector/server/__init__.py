"""Talking to the FHIR server: safe transport, the HTTP client, and what the server says it can do."""
