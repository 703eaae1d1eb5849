"""Stage 3, plan: compare what the input says now with what the ledger says the server has.

``ledger`` is peersync's local state (one SQLite file that owns its schema); ``planner`` decides, per
record, whether to create, update, void or leave it alone.
"""
