# A python3 program: records in an in-memory SQLite database, queried,
# serialized to JSON, compressed and hashed, round after round.
exec python3 /workloads/records.py
