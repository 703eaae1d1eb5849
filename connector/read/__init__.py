"""Stage 1, read: a program's export files, through its mapping profile, into a staging store.

``formats`` streams raw rows out of CSV, JSON, NDJSON and Excel; ``profile`` loads the declarative mapping
profile; ``convert`` turns one raw row into a validated source record (pure); ``staging`` keeps the accepted
records of one run on disk; ``program`` ties them together and writes the rejects report.
"""
