"""Does ORDER BY on a column with ties give the same row order each time? DuckDB, 2 threads, 200k rows of
40 per timestamp (like the flights of one scheduled hour), sorted N times from a shuffled table; prints the
number of distinct row orders per ORDER BY (1 = deterministic). `python bench/row_order.py 10`, beside
e.g. two `yes > /dev/null` for a busy machine. The modelling table sorts by timestamp then row id."""

import sys

import duckdb

c = duckdb.connect()
c.execute("SET threads = 2")
c.execute(
    "CREATE TABLE t AS SELECT i AS id, TIMESTAMP '2013-01-01' + INTERVAL (i // 40) HOUR AS ts, random() AS x FROM range(200000) r(i)"
)
c.execute("CREATE TABLE shuffled AS SELECT * FROM t ORDER BY x")  # not in id order, like joined rows
for order in ("ts", "ts, id"):
    digests = set()
    for _ in range(int(sys.argv[1])):
        c.execute(f"CREATE OR REPLACE TABLE m AS SELECT * FROM shuffled ORDER BY {order}")
        digests.add(hash(tuple(r[0] for r in c.execute("SELECT id FROM m").fetchall())))
    print(f"ORDER BY {order}: {len(digests)} distinct row orders in {sys.argv[1]} builds")
