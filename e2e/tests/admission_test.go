package tests

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Admission: each source's owning shard bounds how many transactions wait
// for its pool, lets them in fairly across client identities, and enforces
// per-client quotas exactly for the whole cluster (see spec.limits).

// admissionSource creates tenants/<name> on the acme database with the
// given spec fragments (pool and limits), waits until it is Ready, and
// deletes it when the test ends.
func admissionSource(t *testing.T, name, pool, limits string) {
	t.Helper()
	t.Cleanup(func() {
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "datasource", name, "--ignore-not-found", "--timeout=60s")
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "secret", name+"-warehouse", "--ignore-not-found")
	})
	manifest := fmt.Sprintf(`apiVersion: v1
kind: Secret
metadata: {name: %[1]s-warehouse, namespace: tenants}
stringData: {password: %[2]q}
---
apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: %[1]s, namespace: tenants}
spec:
  host: %[3]s
  port: %[4]s
  database: acme
  user: %[5]s
  passwordSecretRef: {name: %[1]s-warehouse, key: password}
  tls: {mode: disable}
  pool: %[6]s
  limits: %[7]s
`, name, os.Getenv("WAREHOUSE_PGPASSWORD"), os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER"), pool, limits)
	if _, errOut, err := kubectl(t, manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply %s: %v\n%s", name, err, errOut)
	}
	sourceReady(t, name)
}

// sourceReady waits until tenants/<name> is Ready at its current generation.
func sourceReady(t *testing.T, name string) {
	t.Helper()
	eventually(t, 90*time.Second, "tenants/"+name+" Ready", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", name, "-o", "jsonpath={.status.phase} {.status.observedGeneration} {.metadata.generation}")
		if err != nil {
			return false, err
		}
		f := strings.Fields(out)
		return len(f) == 3 && f[0] == "Ready" && f[1] == f[2], nil
	})
}

// routerAs connects to the router at ip as user (bi or ops) in simple
// protocol mode.
func routerAs(ctx context.Context, t *testing.T, ip, user, password, db string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=%s dbname=%s sslmode=disable connect_timeout=10", ip, user, db))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = password
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect %s as %s: %v", db, user, err)
	}
	return c
}

// warehouseConn is a direct connection to the warehouse, for sampling
// pg_stat_activity.
func warehouseConn(ctx context.Context, t *testing.T) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=%s user=%s dbname=postgres sslmode=disable connect_timeout=10",
		os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER")))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = os.Getenv("WAREHOUSE_PGPASSWORD")
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect to the warehouse: %v", err)
	}
	return c
}

// loops runs n client loops of sql as user through the routers in ips (in
// turn) until ctx ends; it returns each loop's latencies and the errors.
type loopResult struct {
	mu        sync.Mutex
	latencies []time.Duration
	errors    map[string]int
	done      atomic.Int64
}

func (r *loopResult) p(q float64) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.latencies) == 0 {
		return 0
	}
	l := append([]time.Duration(nil), r.latencies...)
	sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
	return l[int(q*float64(len(l)-1))]
}

func runLoops(ctx context.Context, t *testing.T, wg *sync.WaitGroup, ips []string, user, password, db, sql string, n int) *loopResult {
	t.Helper()
	r := &loopResult{errors: map[string]int{}}
	conns := make([]*pgx.Conn, n)
	for i := range conns {
		conns[i] = routerAs(context.Background(), t, ips[i%len(ips)], user, password, db)
	}
	for _, c := range conns {
		wg.Add(1)
		go func(c *pgx.Conn) {
			defer wg.Done()
			defer c.Close(context.Background())
			for ctx.Err() == nil {
				t0 := time.Now()
				qctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				_, err := c.Exec(qctx, sql)
				cancel()
				el := time.Since(t0)
				r.mu.Lock()
				if err != nil {
					code := sqlstate(err)
					if code == "" {
						code = err.Error()
					}
					r.errors[code]++
				} else {
					r.latencies = append(r.latencies, el)
					r.done.Add(1)
				}
				r.mu.Unlock()
				if err != nil && sqlstate(err) == "" {
					return // the connection is gone
				}
			}
		}(c)
	}
	return r
}

// One heavy client (32 loops) and one light client (1 loop) share a pool of
// 4: with fair admission the light one's p99 stays within 3x of its p99
// alone while the pool stays fully used; in arrival order (fairness off)
// it waits behind the heavy one's queue (over 5x).
func TestAdmissionIsFairAcrossClients(t *testing.T) {
	ip, biPW := installed(t)
	opsPW := opsPassword(t)
	admissionSource(t, "fair", "{minIdle: 4, maxSize: 4, acquireTimeout: 20s}", "{fairness: Fair}")
	const sql = "select pg_sleep(0.05)"

	alone := func() time.Duration {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		b := runLoops(ctx, t, &wg, []string{ip}, "bi", biPW, "tenants.fair", sql, 1)
		wg.Wait()
		if len(b.errors) > 0 {
			t.Fatalf("light client alone: errors %v", b.errors)
		}
		return b.p(0.99)
	}
	contended := func(label string) (bP99 time.Duration, total float64) {
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		a := runLoops(ctx, t, &wg, []string{ip}, "ops", opsPW, "tenants.fair", sql, 32)
		time.Sleep(1 * time.Second) // A's queue builds up
		b := runLoops(ctx, t, &wg, []string{ip}, "bi", biPW, "tenants.fair", sql, 1)
		aBefore := a.done.Load()
		const window = 8 * time.Second
		time.Sleep(window)
		aDone, bDone := a.done.Load()-aBefore, b.done.Load()
		cancel()
		wg.Wait()
		if len(a.errors)+len(b.errors) > 0 {
			t.Fatalf("%s: errors heavy %v light %v", label, a.errors, b.errors)
		}
		total = float64(aDone+bDone) / window.Seconds()
		t.Logf("%s: light client p50 %v p99 %v (%d queries); heavy client %d queries; %.1f queries/s in all",
			label, b.p(0.5), b.p(0.99), bDone, aDone, total)
		return b.p(0.99), total
	}

	base := alone()
	t.Logf("light client alone: p99 %v", base)
	fairP99, fairTotal := contended("fair")
	// The pool's capacity: 4 connections, each 50 ms per query plus the
	// round trips.
	capacity := 4 / 0.05
	if fairP99 > 3*base {
		t.Errorf("fair: the light client's p99 %v is over 3x its p99 alone (%v)", fairP99, base)
	}
	if fairTotal < 0.85*capacity {
		t.Errorf("fair: %.1f queries/s in all, under 85%% of the pool's %.0f/s", fairTotal, capacity)
	}

	// The same load in arrival order (changed in place: the pool stays).
	if _, errOut, err := kubectl(t, "", "-n", "tenants", "patch", "datasource", "fair", "--type=merge", "-p", `{"spec":{"limits":{"fairness":"Arrival"}}}`); err != nil {
		t.Fatalf("patch: %v\n%s", err, errOut)
	}
	sourceReady(t, "fair")
	arrivalP99, _ := contended("arrival order")
	if arrivalP99 < 5*base {
		t.Errorf("arrival order: the light client's p99 %v is under 5x its p99 alone (%v): the test cannot tell fairness from its absence", arrivalP99, base)
	}
	t.Logf("light client p99: alone %v, fair %v (%.1fx), arrival order %v (%.1fx)",
		base, fairP99, float64(fairP99)/float64(base), arrivalP99, float64(arrivalP99)/float64(base))
}

// Past limits.maxQueued a transaction is refused at once (53300 over the
// wire, 429 over HTTP); the queued ones complete, and the pool never opens
// more than maxSize connections.
func TestAdmissionQueueIsBounded(t *testing.T) {
	ip, biPW := installed(t)
	token := installCredential(t, "router-http-token")
	admissionSource(t, "bounded", "{minIdle: 2, maxSize: 2, acquireTimeout: 30s}", "{maxQueued: 4}")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Sample the source's server connections throughout.
	wh := warehouseConn(ctx, t)
	defer wh.Close(context.Background())
	var most atomic.Int64
	sampleCtx, stopSampling := context.WithCancel(ctx)
	sampled := make(chan int)
	go func() {
		n := 0
		for sampleCtx.Err() == nil {
			var c int64
			if err := wh.QueryRow(sampleCtx, `SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'shardpool/tenants/bounded/%'`).Scan(&c); err == nil {
				n++
				if c > most.Load() {
					most.Store(c)
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
		sampled <- n
	}()

	// 2 hold the pool, 4 wait: the queue is full.
	var wg sync.WaitGroup
	results := make(chan error, 6)
	for i, sql := range []string{"select pg_sleep(4)", "select pg_sleep(4)", "select 1", "select 1", "select 1", "select 1"} {
		c := routerAs(ctx, t, ip, "bi", biPW, "tenants.bounded")
		defer c.Close(context.Background())
		wg.Add(1)
		go func(c *pgx.Conn, sql string) {
			defer wg.Done()
			_, err := c.Exec(ctx, sql)
			results <- err
		}(c, sql)
		if i < 2 {
			time.Sleep(300 * time.Millisecond)
		}
	}
	eventually(t, 10*time.Second, "4 transactions queued", func() (bool, error) {
		v, ok := shardMetric(t, "shardpool_admission_queued", map[string]string{"source": "bounded"})
		return ok && v == 4, nil
	})

	// Extra clients are refused at once, over the wire and over HTTP.
	for i := 0; i < 3; i++ {
		c := routerAs(ctx, t, ip, "bi", biPW, "tenants.bounded")
		t0 := time.Now()
		_, err := c.Exec(ctx, "select 1")
		el := time.Since(t0)
		c.Close(context.Background())
		if sqlstate(err) != "53300" || !strings.Contains(err.Error(), "limits.maxQueued (4)") {
			t.Fatalf("extra client %d: want 53300 naming limits.maxQueued, got %v", i, err)
		}
		if el > time.Second {
			t.Errorf("extra client %d refused after %v, not at once", i, el)
		}
	}
	code, r, hdr := postQuery(t, ip, token, "tenants", "bounded", `{"sql": "select 1"}`)
	if code != http.StatusTooManyRequests || r.Error == nil || r.Error.SQLState != "53300" || hdr.Get("Retry-After") == "" {
		t.Fatalf("HTTP past maxQueued: want 429 with 53300 and Retry-After, got %d %+v %v", code, r.Error, hdr)
	}

	wg.Wait()
	close(results)
	for err := range results {
		if err != nil {
			t.Errorf("a queued or running transaction failed: %v", err)
		}
	}
	stopSampling()
	n := <-sampled
	if most.Load() > 2 {
		t.Errorf("%d server connections of the source at once; maxSize is 2", most.Load())
	}
	if n < 50 {
		t.Errorf("only %d pg_stat_activity samples", n)
	}
	refused, _ := shardMetric(t, "shardpool_admission_refused_total", map[string]string{"source": "bounded", "reason": "queue_full"})
	if refused < 4 {
		t.Errorf("shardpool_admission_refused_total{reason=queue_full} = %v, want >= 4", refused)
	}
	t.Logf("4 queued completed; 3 wire + 1 HTTP refused at once; most server connections seen %d in %d samples", most.Load(), n)
}

// shardMetric sums a metric's samples matching labels over every shard pod.
func shardMetric(t *testing.T, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	var sum float64
	found := false
	for _, ip := range podIPs(t, "shard") {
		if v, ok := value(scrape(t, ip), name, labels); ok {
			sum += v
			found = true
		}
	}
	return sum, found
}

// perClientRun sends n loops of sql as ops through every router in ips for
// d, and returns how many completed in the last `window` of it.
func perClientRun(t *testing.T, ips []string, opsPW, db, sql string, n int, warm, window time.Duration) (*loopResult, int64) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	r := runLoops(ctx, t, &wg, ips, "ops", opsPW, db, sql, n)
	time.Sleep(warm)
	before := r.done.Load()
	time.Sleep(window)
	done := r.done.Load() - before
	cancel()
	wg.Wait()
	return r, done
}

// limits.perClient holds cluster-wide: one client sending through two
// routers at once runs at most maxConcurrent transactions (seen in
// pg_stat_activity) and at most `rate` per second.
func TestPerClientQuotasHoldAcrossRouters(t *testing.T) {
	_, _ = installed(t)
	opsPW := opsPassword(t)
	helmSet(t, "router.replicas=2")
	t.Cleanup(func() {
		helmSet(t, "router.replicas=1")
		routersSettled(t, 1)
	})
	ips := routersSettled(t, 2)
	admissionSource(t, "quota", "{minIdle: 2, maxSize: 8, acquireTimeout: 20s}", "{perClient: {maxConcurrent: 3}}")

	// maxConcurrent: 12 loops of a 200 ms query, 6 through each router.
	ctx, cancel := context.WithCancel(context.Background())
	wh := warehouseConn(ctx, t)
	var most, samples atomic.Int64
	sampling := make(chan struct{})
	go func() {
		defer close(sampling)
		for ctx.Err() == nil {
			var c int64
			if err := wh.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'shardpool/tenants/quota/%' AND query = 'select pg_sleep(0.2)' AND state = 'active'`).Scan(&c); err == nil {
				samples.Add(1)
				if c > most.Load() {
					most.Store(c)
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	r, done := perClientRun(t, ips, opsPW, "tenants.quota", "select pg_sleep(0.2)", 12, 2*time.Second, 8*time.Second)
	cancel()
	<-sampling
	wh.Close(context.Background())
	if len(r.errors) > 0 {
		t.Errorf("maxConcurrent run: errors %v", r.errors)
	}
	rate := float64(done) / 8
	t.Logf("maxConcurrent 3: %d queries in 8 s (%.1f/s; 3 at 200 ms each is 15/s); most running at once %d in %d samples", done, rate, most.Load(), samples.Load())
	if most.Load() > 3 {
		t.Errorf("%d transactions of one client ran at once; limits.perClient.maxConcurrent is 3", most.Load())
	}
	if most.Load() < 3 || rate < 0.95*15*0.85 || rate > 15*1.05 {
		t.Errorf("maxConcurrent 3 not reached or exceeded: %.1f queries/s, most at once %d", rate, most.Load())
	}

	// rate: 40/s with a burst of 5, through both routers.
	if _, errOut, err := kubectl(t, "", "-n", "tenants", "patch", "datasource", "quota", "--type=merge", "-p", `{"spec":{"limits":{"perClient":{"maxConcurrent":null,"rate":40,"burst":5}}}}`); err != nil {
		t.Fatalf("patch: %v\n%s", err, errOut)
	}
	sourceReady(t, "quota")
	r, done = perClientRun(t, ips, opsPW, "tenants.quota", "select 1", 8, 2*time.Second, 10*time.Second)
	if len(r.errors) > 0 {
		t.Errorf("rate run: errors %v", r.errors)
	}
	got := float64(done) / 10
	t.Logf("rate 40/s: %d queries in 10 s through 2 routers = %.1f/s", done, got)
	if got < 40*0.95 || got > 40*1.05 {
		t.Errorf("rate limit 40/s: measured %.1f/s, not within 5%%", got)
	}
}

// A client that waits longer than limits.noticeAfter hears so: psql prints
// the NOTICE, psycopg's notice handler receives it; and the HTTP API says
// how long a query queued in the shardpool-queue-ms header.
func TestQueueWaitsAreVisible(t *testing.T) {
	ip, biPW := installed(t)
	token := installCredential(t, "router-http-token")
	admissionSource(t, "visible", "{minIdle: 1, maxSize: 1, acquireTimeout: 20s}", "{noticeAfter: 500ms}")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	hold := func(d string) chan error {
		c := routerAs(ctx, t, ip, "bi", biPW, "tenants.visible")
		done := make(chan error, 1)
		go func() {
			defer c.Close(context.Background())
			_, err := c.Exec(ctx, "select pg_sleep("+d+")")
			done <- err
		}()
		time.Sleep(200 * time.Millisecond)
		return done
	}

	// psql.
	held := hold("2")
	_, errOut, err := psqlRouter(t, ip, biPW, "tenants.visible", "-c", "select 1")
	if err != nil {
		t.Fatalf("psql: %v\n%s", err, errOut)
	}
	if !strings.Contains(errOut, "NOTICE:") || !strings.Contains(errOut, "number 1 in the queue") {
		t.Errorf("psql did not print the queue NOTICE; stderr:\n%s", errOut)
	}
	if err := <-held; err != nil {
		t.Fatal(err)
	}

	// psycopg.
	py := pythonWithPsycopg(t)
	held = hold("2")
	script := `
import sys, psycopg
notices = []
with psycopg.connect(sys.argv[1]) as c:
    c.add_notice_handler(lambda d: notices.append(d.message_primary))
    c.execute("select 1")
print("\n".join(notices))
`
	dsn := fmt.Sprintf("host=%s port=5432 user=bi dbname=tenants.visible sslmode=disable password=%s", ip, biPW)
	pyCtx, pyCancel := context.WithTimeout(ctx, 60*time.Second)
	out, err := exec.CommandContext(pyCtx, py, "-c", script, dsn).CombinedOutput()
	pyCancel()
	if err != nil {
		t.Fatalf("psycopg: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "number 1 in the queue") {
		t.Errorf("psycopg's notice handler got no queue NOTICE: %q", out)
	}
	if err := <-held; err != nil {
		t.Fatal(err)
	}

	// HTTP: the header is there, and says how long the query queued.
	code, _, hdr := postQuery(t, ip, token, "tenants", "visible", `{"sql": "select 1"}`)
	if code != 200 || hdr.Get("shardpool-queue-ms") == "" {
		t.Fatalf("HTTP: want 200 with shardpool-queue-ms, got %d %v", code, hdr)
	}
	held = hold("1.5")
	code, _, hdr = postQuery(t, ip, token, "tenants", "visible", `{"sql": "select 1"}`)
	ms, perr := strconv.ParseFloat(hdr.Get("shardpool-queue-ms"), 64)
	if code != 200 || perr != nil || ms < 800 {
		t.Errorf("HTTP behind a 1.5 s transaction: want 200 with shardpool-queue-ms >= 800, got %d %q", code, hdr.Get("shardpool-queue-ms"))
	}
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	t.Logf("psql and psycopg got the NOTICE; HTTP queued %.0f ms behind a 1.5 s transaction", ms)
}

// Tags attribute cost: a leading /* shardpool:tag=... */ comment, the
// client's application_name and the HTTP request's "tag" each count
// transactions, server time and rows under their tag.
func TestTagsAttributeCost(t *testing.T) {
	ip, biPW := installed(t)
	token := installCredential(t, "router-http-token")
	admissionSource(t, "tagged", "{minIdle: 1, maxSize: 2}", "{}")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// dash-1: 5 transactions of 10 rows, one of them 30 ms long.
	c := routerAs(ctx, t, ip, "bi", biPW, "tenants.tagged")
	for i := 0; i < 4; i++ {
		if _, err := c.Exec(ctx, "/* shardpool:tag=dash-1 */ select generate_series(1, 10)"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Exec(ctx, "/* shardpool:tag=dash-1 */ select generate_series(1, 10), pg_sleep(0.03)"); err != nil {
		t.Fatal(err)
	}
	// Untagged: not counted under any tag.
	if _, err := c.Exec(ctx, "select generate_series(1, 3)"); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	// etl-nightly: application_name, 3 transactions of 4 rows.
	for i := 0; i < 3; i++ {
		if _, errOut, err := psqlRouter(t, ip, biPW, "tenants.tagged application_name=etl-nightly", "-c", "select generate_series(1, 4)"); err != nil {
			t.Fatalf("psql: %v\n%s", err, errOut)
		}
	}
	// api-report: HTTP, 2 transactions of 7 rows.
	for i := 0; i < 2; i++ {
		if code, r, _ := postQuery(t, ip, token, "tenants", "tagged", `{"sql": "select generate_series(1, 7)", "tag": "api-report"}`); code != 200 {
			t.Fatalf("HTTP: %d %+v", code, r.Error)
		}
	}

	want := map[string][2]float64{"dash-1": {5, 50}, "etl-nightly": {3, 12}, "api-report": {2, 14}}
	eventually(t, 10*time.Second, "tag metrics", func() (bool, error) {
		for tag, w := range want {
			l := map[string]string{"namespace": "tenants", "source": "tagged", "tag": tag}
			n, _ := shardMetric(t, "shardpool_tag_transactions_total", l)
			rows, _ := shardMetric(t, "shardpool_tag_rows_total", l)
			if n != w[0] || rows != w[1] {
				return false, fmt.Errorf("%s: %v transactions, %v rows; want %v, %v", tag, n, rows, w[0], w[1])
			}
		}
		return true, nil
	})
	secs, _ := shardMetric(t, "shardpool_tag_server_seconds_total", map[string]string{"source": "tagged", "tag": "dash-1"})
	if secs < 0.03 || secs > 5 {
		t.Errorf("dash-1 server seconds %v, want at least the 30 ms sleep", secs)
	}
	other, _ := shardMetric(t, "shardpool_tag_transactions_total", map[string]string{"source": "tagged", "tag": "other"})
	if other != 0 {
		t.Errorf("%v transactions under other; three tags are far below the bound", other)
	}
	t.Logf("dash-1: 5 transactions, 50 rows, %.3f s on the server; etl-nightly: 3, 12; api-report: 2, 14", secs)
}

// limits.perClient.statementTimeout is a ceiling the client cannot raise:
// a statement running past it is cancelled on the warehouse (57014), after
// a NOTICE that names the limit.
func TestPerClientStatementTimeoutCancels(t *testing.T) {
	ip, biPW := installed(t)
	admissionSource(t, "ceiling", "{minIdle: 1, maxSize: 2}", "{perClient: {statementTimeout: 1s}}")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=bi dbname=tenants.ceiling sslmode=disable connect_timeout=10", ip))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = biPW
	var notices []string
	var mu sync.Mutex
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		mu.Lock()
		notices = append(notices, n.Message)
		mu.Unlock()
	}
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	// Raising the server-side timeout does not lift the ceiling.
	if _, err := c.Exec(ctx, "set statement_timeout = 0"); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	_, err = c.Exec(ctx, "select pg_sleep(10)")
	el := time.Since(t0)
	if sqlstate(err) != "57014" || el > 3*time.Second {
		t.Fatalf("want 57014 after about 1 s, got %v after %v", err, el)
	}
	mu.Lock()
	got := strings.Join(notices, "\n")
	mu.Unlock()
	if !strings.Contains(got, "limits.perClient.statementTimeout") {
		t.Errorf("no NOTICE naming the limit; notices: %q", got)
	}
	// The session and the connection go on.
	var one int
	if err := c.QueryRow(ctx, "select 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("after the cancel: %v", err)
	}
	t.Logf("cancelled after %v with %q", el.Round(time.Millisecond), got)
}

// Weights from the router's auth Secret (key `weights`) reach the shard's
// queue: with both users keeping the pool busy, a user of weight 3 gets
// about three transactions for every one of a user of weight 1.
func TestAdmissionWeightsShareThePool(t *testing.T) {
	ip, biPW := installed(t)
	opsPW := opsPassword(t)
	admissionSource(t, "weighted", "{minIdle: 2, maxSize: 2, acquireTimeout: 20s}", "{}")
	patch := func(weights string) {
		t.Helper()
		var p string
		if weights == "" {
			p = `[{"op": "remove", "path": "/data/weights"}]`
		} else {
			p = fmt.Sprintf(`[{"op": "add", "path": "/data/weights", "value": %q}]`, base64.StdEncoding.EncodeToString([]byte(weights)))
		}
		if _, errOut, err := kubectl(t, "", "-n", systemNS, "patch", "secret", "shardpool-router-auth", "--type=json", "-p", p); err != nil {
			t.Fatalf("patch the auth Secret: %v\n%s", err, errOut)
		}
	}
	patch("# BI backends\nbi=3\nops=1\n")
	t.Cleanup(func() { patch("") })

	share := func() (float64, int64, int64) {
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		a := runLoops(ctx, t, &wg, []string{ip}, "ops", opsPW, "tenants.weighted", "select pg_sleep(0.05)", 8)
		b := runLoops(ctx, t, &wg, []string{ip}, "bi", biPW, "tenants.weighted", "select pg_sleep(0.05)", 8)
		time.Sleep(time.Second)
		a0, b0 := a.done.Load(), b.done.Load()
		time.Sleep(4 * time.Second)
		an, bn := a.done.Load()-a0, b.done.Load()-b0
		cancel()
		wg.Wait()
		if len(a.errors)+len(b.errors) > 0 {
			t.Fatalf("errors: ops %v bi %v", a.errors, b.errors)
		}
		return float64(bn) / float64(an+bn), an, bn
	}
	// The router applies a new Secret version within seconds; sessions
	// take the weight in force when they open.
	var got float64
	var an, bn int64
	deadline := time.Now().Add(45 * time.Second)
	for {
		got, an, bn = share()
		if (got > 0.68 && got < 0.82) || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("weights bi=3, ops=1: bi ran %d, ops %d transactions in 4 s: bi's share %.2f (3/4 = 0.75)", bn, an, got)
	if got <= 0.68 || got >= 0.82 {
		t.Errorf("bi's share %.2f, want about 0.75", got)
	}
}
