"""Stage 4, write: push planned units to the FHIR server, idempotently, one participant at a time.

``decisions`` holds the write stage's pure decisions (chunking, bisection, strategy, response checking);
``bundle`` assembles transactions; ``patients`` looks Patients up by MRN; ``writer`` does the I/O.
"""
