"""The python workload: real library code (sqlite3, json, zlib, hashlib,
re, collections) over generated records, with a working set that changes
every round."""

import collections
import hashlib
import json
import random
import re
import sqlite3
import time
import zlib

WORDS = re.findall(r"[a-z]+", __doc__.lower()) + ["alpha", "beta", "gamma", "delta"]


def round_of(db, n, rng):
    rows = [
        (n * 10_000 + i, rng.choice(WORDS), rng.randrange(1_000_000), " ".join(rng.choices(WORDS, k=8)))
        for i in range(5_000)
    ]
    db.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
    db.execute("DELETE FROM records WHERE id < ?", ((n - 8) * 10_000,))
    top = db.execute(
        "SELECT word, COUNT(*), AVG(value) FROM records GROUP BY word ORDER BY 2 DESC LIMIT 10"
    ).fetchall()
    text = json.dumps({"round": n, "top": top, "sample": rows[:200]})
    packed = zlib.compress(text.encode(), 6)
    digest = hashlib.sha256(packed).hexdigest()
    counts = collections.Counter(w for row in rows for w in row[3].split())
    return digest, counts.most_common(3)


def main():
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, word TEXT, value INTEGER, text TEXT)")
    db.execute("CREATE INDEX by_word ON records (word)")
    rng = random.Random()
    n = 0
    while True:
        round_of(db, n, rng)
        n += 1
        time.sleep(0.1)


main()
