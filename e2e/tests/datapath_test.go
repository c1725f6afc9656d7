package tests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// These tests need shardpool installed by e2e/install.sh (run-tests.sh does
// it): the chart in shardpool-system and the examples in tenants.

const systemNS = "shardpool-system"

func installed(t *testing.T) (routerIP, password string) {
	t.Helper()
	c := client(t)
	pods, err := c.CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=router"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if _, ok := podReadySince(&p); ok && p.DeletionTimestamp == nil {
			routerIP = p.Status.PodIP
		}
	}
	if routerIP == "" {
		t.Fatal("no Ready router pod in shardpool-system: run e2e/install.sh")
	}
	return routerIP, installCredential(t, "router-bi")
}

// psqlRouter runs psql against the router as user bi; returns stdout, stderr.
func psqlRouter(t *testing.T, ip, password, database string, args ...string) (string, string, error) {
	t.Helper()
	return psqlRouterAs(t, "bi", ip, password, database, args...)
}

// opsPassword is the password of the router user allowed in every namespace.
func opsPassword(t *testing.T) string {
	t.Helper()
	return installCredential(t, "router-ops")
}

// psqlRouterAs runs psql against the router as `user`.
func psqlRouterAs(t *testing.T, user, ip, password, database string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	full := append([]string{"-X", "-At", "-v", "ON_ERROR_STOP=1", fmt.Sprintf("host=%s port=5432 user=%s dbname=%s connect_timeout=10", ip, user, database)}, args...)
	cmd := exec.CommandContext(ctx, "psql", full...)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+password, "PGSSLMODE=prefer")
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func warehouse(t *testing.T, db, sql string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql)
	cmd.Env = append(os.Environ(),
		"PGHOST="+os.Getenv("WAREHOUSE_PGHOST"), "PGPORT="+os.Getenv("WAREHOUSE_PGPORT"),
		"PGUSER="+os.Getenv("WAREHOUSE_PGUSER"), "PGPASSWORD="+os.Getenv("WAREHOUSE_PGPASSWORD"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("warehouse %s: %s: %v\n%s", db, sql, err, out)
	}
	return strings.TrimSpace(string(out))
}

// Each example source answers through the router with the warehouse's rows.
func TestExamplesQueryableThroughTheRouter(t *testing.T) {
	ip, pw := installed(t)
	cases := map[string][2]string{
		"tenants.acme":    {"SELECT count(*), sum(amount) FROM orders", ""},
		"tenants.globex":  {"SELECT origin || '=' || count(*) FROM shipments GROUP BY origin ORDER BY origin", ""},
		"tenants.initech": {"SELECT count(*) FILTER (WHERE has_cover_sheet) FROM tps_reports", ""},
	}
	for db, c := range cases {
		want := warehouse(t, strings.TrimPrefix(db, "tenants."), c[0])
		got, stderr, err := psqlRouter(t, ip, pw, db, "-c", c[0])
		if err != nil {
			t.Errorf("%s: %v\n%s", db, err, stderr)
			continue
		}
		if strings.TrimSpace(got) != want {
			t.Errorf("%s: router gave %q, warehouse %q", db, strings.TrimSpace(got), want)
		}
	}
}

func pgxConn(t *testing.T, ip, password, database string, mode pgx.QueryExecMode) (*pgx.Conn, error) {
	t.Helper()
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=bi dbname=%s sslmode=prefer connect_timeout=10", ip, database))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = password
	cfg.DefaultQueryExecMode = mode
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return pgx.ConnectConfig(ctx, cfg)
}

func sqlstate(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// Errors keep their SQLSTATE, at connect time (unknown source, namespace
// not allowed, bad password) and in queries.
func TestErrorsCarryTheirSQLSTATE(t *testing.T) {
	ip, pw := installed(t)
	connects := []struct{ db, password, want string }{
		{"tenants.nope", pw, "3D000"},
		{"kube-system.acme", pw, "3D000"},
		{"acme", pw, "3D000"},
		{"tenants.acme", "wrong-password", "28P01"},
	}
	for _, c := range connects {
		conn, err := pgxConn(t, ip, c.password, c.db, pgx.QueryExecModeSimpleProtocol)
		if err == nil {
			conn.Close(context.Background())
			t.Errorf("connect to %s succeeded, want SQLSTATE %s", c.db, c.want)
		} else if got := sqlstate(err); got != c.want {
			t.Errorf("connect to %s: SQLSTATE %q (%v), want %s", c.db, got, err, c.want)
		}
	}
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeExec, pgx.QueryExecModeCacheStatement} {
		conn, err := pgxConn(t, ip, pw, "tenants.acme", mode)
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		ctx := context.Background()
		for sql, want := range map[string]string{
			"SELECT 1/0":                  "22012",
			"SELECT * FROM no_such_table": "42P01",
			"SELEC 1":                     "42601",
			"INSERT INTO orders VALUES (1, 'x', 1, now())": "42501",
		} {
			_, err := conn.Exec(ctx, sql)
			if got := sqlstate(err); got != want {
				t.Errorf("mode %v, %q: SQLSTATE %q (%v), want %s", mode, sql, got, err, want)
			}
		}
		// A failed transaction rolls back and the session goes on.
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatalf("begin: %v", err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1/0"); sqlstate(err) != "22012" {
			t.Errorf("in transaction: %v", err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); sqlstate(err) != "25P02" {
			t.Errorf("after an error in a transaction: want 25P02, got %v", err)
		}
		_ = tx.Rollback(ctx)
		var n int
		if err := conn.QueryRow(ctx, "SELECT 42").Scan(&n); err != nil || n != 42 {
			t.Errorf("session after a failed transaction: %v %d", err, n)
		}
		conn.Close(ctx)
	}
}

// pgx (Go), with typed parameters and results in binary format, named
// prepared statements (statement cache) and transactions.
func TestGoDriverThroughTheRouter(t *testing.T) {
	ip, pw := installed(t)
	conn, err := pgxConn(t, ip, pw, "tenants.acme", pgx.QueryExecModeCacheStatement)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	ctx := context.Background()
	defer conn.Close(ctx)
	for i := 0; i < 20; i++ {
		var count int64
		var total pgtype.Numeric
		var first time.Time
		err := conn.QueryRow(ctx, "SELECT count(*), sum(amount), min(placed_at)::timestamptz FROM orders WHERE id <= $1", int32(100+i)).Scan(&count, &total, &first)
		if err != nil {
			t.Fatalf("typed query %d: %v", i, err)
		}
		if count != int64(100+i) || !total.Valid || first.IsZero() {
			t.Fatalf("typed query %d: count %d total %+v first %v", i, count, total, first)
		}
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE scratch (x int) ON COMMIT DROP"); err != nil {
		t.Fatalf("temp table in a transaction: %v", err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO scratch SELECT generate_series(1, 10)"); err != nil {
		t.Fatal(err)
	}
	var sum int
	if err := tx.QueryRow(ctx, "SELECT sum(x) FROM scratch").Scan(&sum); err != nil || sum != 55 {
		t.Fatalf("transaction kept its server connection: %v %d", err, sum)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
}

// The operator records assignments as Events on the DataSource, shown by
// kubectl describe.
func TestAssignmentEvents(t *testing.T) {
	installed(t)
	eventually(t, 20*time.Second, "an Assigned event on tenants/acme", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "describe", "datasource", "acme")
		return strings.Contains(out, "Assigned") && strings.Contains(out, "assigned to shard"), err
	})
}

// Every source has exactly minIdle warm connections, all from the shard
// that owns it (application_name shardpool/<ns>/<name>/<shard>/<process>).
func TestOnePoolPerSourceAtMinIdle(t *testing.T) {
	installed(t)
	want := map[string]int{"acme": 2, "globex": 2, "initech": 1}
	shards := map[string]string{}
	for name := range want {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", name, "-o", "jsonpath={.status.shard}")
		if err != nil || out == "" {
			t.Fatalf("%s has no shard: %v", name, err)
		}
		shards[name] = out
	}
	eventually(t, 30*time.Second, "pg_stat_activity shows exactly minIdle connections per source, all from one process of its shard", func() (bool, error) {
		rows := warehouse(t, "postgres", "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'shardpool/tenants/%' AND application_name NOT LIKE 'shardpool/tenants/bench%'")
		count := map[string]int{}
		owners := map[string]map[string]bool{}
		for _, app := range strings.Split(rows, "\n") {
			src, shard, owner, ok := appOwner(app)
			if !ok {
				continue
			}
			name := strings.TrimPrefix(src, "tenants/")
			if _, known := want[name]; !known {
				return false, fmt.Errorf("connection of an unknown source: %s", app)
			}
			if shard != shards[name] {
				return false, fmt.Errorf("%s: connection from shard %s, assigned to %s", name, shard, shards[name])
			}
			count[name]++
			if owners[name] == nil {
				owners[name] = map[string]bool{}
			}
			owners[name][owner] = true
		}
		for name, n := range want {
			if count[name] != n || len(owners[name]) != 1 {
				return false, fmt.Errorf("%s: %d connections from %d processes, want %d from 1", name, count[name], len(owners[name]), n)
			}
		}
		return true, nil
	})
}

// pgbench in all three query modes runs through the router with no failed
// transaction; named prepared statements survive transaction pooling.
func TestPgbenchAllModes(t *testing.T) {
	ip, pw := installed(t)
	bench := ensureBenchSource(t)
	for _, mode := range []string{"simple", "extended", "prepared"} {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		cmd := exec.CommandContext(ctx, "pgbench", "-h", ip, "-p", "5432", "-U", "bi", "-M", mode, "-c", "8", "-j", "2", "-t", "200", "-n", bench)
		cmd.Env = append(os.Environ(), "PGPASSWORD="+pw)
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			t.Errorf("pgbench -M %s: %v\n%s", mode, err, out)
			continue
		}
		m := regexp.MustCompile(`number of transactions actually processed: (\d+)/(\d+)`).FindStringSubmatch(string(out))
		if m == nil || m[1] != m[2] || m[1] != "1600" {
			t.Errorf("pgbench -M %s did not process all 1600 transactions:\n%s", mode, out)
		}
		if !strings.Contains(string(out), "number of failed transactions: 0 ") {
			t.Errorf("pgbench -M %s had failed transactions:\n%s", mode, out)
		}
		tps := regexp.MustCompile(`tps = ([0-9.]+)`).FindStringSubmatch(string(out))
		if tps != nil {
			t.Logf("pgbench -M %s, 8 clients, TPC-B-like: %s tps (debug build, shared 2-core machine)", mode, tps[1])
		}
	}
}

// ensureBenchSource creates (once) a pgbench database and its DataSource
// tenants/bench and returns the router database name. The DataSource and
// its Secret are removed when the test ends (the database stays: pgbench's
// tables are the same every time).
func ensureBenchSource(t *testing.T) string {
	t.Helper()
	t.Cleanup(func() {
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "datasource", "bench", "--ignore-not-found", "--timeout=30s")
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "secret", "bench-warehouse", "--ignore-not-found")
	})
	if warehouse(t, "postgres", "SELECT count(*) FROM pg_database WHERE datname = 'bench'") == "0" {
		warehouse(t, "postgres", "CREATE DATABASE bench")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "pgbench", "-i", "-s", "1", "-q", "bench")
		cmd.Env = append(os.Environ(),
			"PGHOST="+os.Getenv("WAREHOUSE_PGHOST"), "PGPORT="+os.Getenv("WAREHOUSE_PGPORT"),
			"PGUSER="+os.Getenv("WAREHOUSE_PGUSER"), "PGPASSWORD="+os.Getenv("WAREHOUSE_PGPASSWORD"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("pgbench -i: %v\n%s", err, out)
		}
	}
	manifest := fmt.Sprintf(`apiVersion: v1
kind: Secret
metadata: {name: bench-warehouse, namespace: tenants}
stringData: {password: %q}
---
apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: bench, namespace: tenants}
spec:
  host: %s
  port: %s
  database: bench
  user: %s
  passwordSecretRef: {name: bench-warehouse, key: password}
  tls: {mode: disable}
  pool: {minIdle: 4, maxSize: 16}
`, os.Getenv("WAREHOUSE_PGPASSWORD"), os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER"))
	if _, stderr, err := kubectl(t, manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply bench source: %v\n%s", err, stderr)
	}
	eventually(t, 30*time.Second, "tenants/bench Ready", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "bench", "-o", "jsonpath={.status.phase}")
		return out == "Ready", err
	})
	return "tenants.bench"
}

// A new DataSource is Ready and answers through the router quickly; the
// figure is logged (target: under 1 s).
func TestNewSourceQueryableQuickly(t *testing.T) {
	ip, pw := installed(t)
	name := "fresh" + strconv.FormatInt(time.Now().UnixNano()%100000, 10)
	manifest := fmt.Sprintf(`apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: %s, namespace: tenants}
spec:
  host: %s
  port: %s
  database: acme
  user: acme_bi
  passwordSecretRef: {name: acme-warehouse, key: password}
  tls: {mode: disable}
  pool: {minIdle: 1, maxSize: 4}
`, name, os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"))
	start := time.Now()
	if _, stderr, err := kubectl(t, manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	t.Cleanup(func() { _, _, _ = kubectl(t, "", "-n", "tenants", "delete", "datasource", name, "--wait=false") })
	var ok time.Duration
	eventually(t, 20*time.Second, "new source answers through the router", func() (bool, error) {
		out, _, err := psqlRouter(t, ip, pw, "tenants."+name, "-c", "SELECT count(*) FROM orders")
		if err == nil && strings.TrimSpace(out) == "500" {
			ok = time.Since(start)
			return true, nil
		}
		return false, err
	})
	t.Logf("apply -> first successful query through the router: %s (target < 1s)", ok.Round(time.Millisecond))
	if ok > time.Second {
		t.Errorf("new source took %s to answer, target is under 1s", ok)
	}
}
