"""Runs psycopg 3 (Python's PostgreSQL driver) through the shardpool router
and checks each result. Connection settings come from the environment:
ROUTER_HOST, ROUTER_USER, ROUTER_PASSWORD, ROUTER_DB (namespace.name),
EXPECT_SUM (sum(amount) of the orders table, from the warehouse directly).
Prints one line per check; exits 1 if any failed."""

import os
import sys
import threading
import time

import psycopg
from psycopg import errors

failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail else ""))
    if not cond:
        failures.append(name)


def connect(**kw):
    return psycopg.connect(
        host=os.environ["ROUTER_HOST"],
        port=5432,
        user=os.environ["ROUTER_USER"],
        password=os.environ["ROUTER_PASSWORD"],
        dbname=os.environ["ROUTER_DB"],
        connect_timeout=10,
        **kw,
    )


want_sum = os.environ["EXPECT_SUM"]

with connect(autocommit=True) as conn:
    # Simple query protocol (no parameters).
    row = conn.execute("SELECT count(*), sum(amount)::text FROM orders").fetchone()
    check("simple query", row is not None and row[1] == want_sum, f"{row}")

    # Extended protocol, text parameters (psycopg binds server-side).
    row = conn.execute(
        "SELECT count(*) FROM orders WHERE amount > %s AND customer <> %s", (0, "nobody")
    ).fetchone()
    check("extended query with parameters", row is not None and row[0] > 0, f"{row}")

    # Binary parameters and results.
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT %b::int8 + 1, %b::text || 'x', %b::numeric", (41, "ab", 1.5))
        row = cur.fetchone()
        ok = row is not None and row[0] == 42 and row[1] == "abx" and float(row[2]) == 1.5
        check("binary parameters and results", ok, f"{row}")

    # Named prepared statements (prepare=True), run several times: they must
    # survive transaction pooling across server connections.
    vals = [conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone()[0] for i in range(8)]
    check("prepared statement reused 8 times", vals == [i * 2 for i in range(8)], f"{vals}")

    # SQLSTATE of errors, and the connection stays usable.
    try:
        conn.execute("SELECT 1/0")
        check("division by zero raises 22012", False, "no error")
    except errors.DivisionByZero as e:
        check("division by zero raises 22012", e.sqlstate == "22012", e.sqlstate or "")
    try:
        conn.execute("SELECT * FROM no_such_table")
        check("undefined table raises 42P01", False, "no error")
    except errors.UndefinedTable as e:
        check("undefined table raises 42P01", e.sqlstate == "42P01", e.sqlstate or "")
    check("connection usable after errors", conn.execute("SELECT 7").fetchone()[0] == 7)

# Transactions: rollback discards, commit keeps (temporary table lives in
# the transaction's server connection only, so use one transaction each).
with connect() as conn:
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
        conn.execute("INSERT INTO t SELECT generate_series(1, 5)")
        n = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    check("transaction sees its own writes", n == 5, f"{n}")
    try:
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1/0")
    except errors.DivisionByZero:
        pass
    check("connection usable after a rolled-back transaction", conn.execute("SELECT 8").fetchone()[0] == 8)

# Cancel: a long query is cancelled from another thread (CancelRequest
# through the router to the shard's server connection): 57014.
with connect(autocommit=True) as conn:
    t = threading.Timer(0.5, conn.cancel)
    t.start()
    started = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(20)")
        check("cancel stops pg_sleep with 57014", False, "no error")
    except errors.QueryCanceled as e:
        took = time.monotonic() - started
        check("cancel stops pg_sleep with 57014", e.sqlstate == "57014" and took < 5, f"{e.sqlstate} after {took:.2f}s")
    check("connection usable after cancel", conn.execute("SELECT 9").fetchone()[0] == 9)

# A denied namespace looks like an unknown database.
try:
    psycopg.connect(
        host=os.environ["ROUTER_HOST"], port=5432, user=os.environ["ROUTER_USER"],
        password=os.environ["ROUTER_PASSWORD"], dbname="kube-system.acme", connect_timeout=10,
    )
    check("denied namespace refused with 3D000", False, "connected")
except psycopg.OperationalError as e:
    check("denied namespace refused with 3D000", "does not exist" in str(e), str(e).strip())

print(f"{len(failures)} failed")
sys.exit(1 if failures else 0)
