package tests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"shardpool.dev/e2e/fault"
)

// txTally counts a transaction client's outcomes.
type txTally struct {
	mu sync.Mutex
	// done: committed transactions; retried: transactions run again
	// after a 57P01 before they began; inside: failures after BEGIN.
	done, retried int
	inside        []string
	// before: other failures (connect, or at BEGIN after the retry).
	before []string
}

// txClient runs BEGIN; SELECT 1; SELECT pg_sleep(0.02); COMMIT again and
// again, as a pool that reconnects and retries once when the connection
// was closed at an idle point (57P01 at BEGIN); any failure after BEGIN
// is a failure inside a transaction.
func txClient(ctx context.Context, connect func(context.Context) (*pgx.Conn, error), tally *txTally, wg *sync.WaitGroup) {
	defer wg.Done()
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			_ = conn.Close(context.Background())
		}
	}()
	record := func(f func()) { tally.mu.Lock(); f(); tally.mu.Unlock() }
	for ctx.Err() == nil {
		if conn == nil {
			c, err := connect(ctx)
			if err != nil {
				if ctx.Err() == nil {
					record(func() { tally.before = append(tally.before, "connect: "+err.Error()) })
					time.Sleep(100 * time.Millisecond)
				}
				continue
			}
			conn = c
		}
		qctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := conn.Exec(qctx, "BEGIN")
		if err != nil && sqlstate(err) == "57P01" {
			_ = conn.Close(context.Background())
			conn = nil
			record(func() { tally.retried++ })
			if c, cerr := connect(qctx); cerr == nil {
				conn = c
				_, err = conn.Exec(qctx, "BEGIN")
			} else {
				err = cerr
			}
		}
		if err != nil {
			cancel()
			record(func() { tally.before = append(tally.before, "begin: "+err.Error()) })
			if conn != nil {
				_ = conn.Close(context.Background())
				conn = nil
			}
			continue
		}
		for _, q := range []string{"SELECT 1", "SELECT pg_sleep(0.02)", "COMMIT"} {
			if _, err = conn.Exec(qctx, q); err != nil {
				break
			}
		}
		cancel()
		if err != nil {
			record(func() { tally.inside = append(tally.inside, err.Error()) })
			_ = conn.Close(context.Background())
			conn = nil
			continue
		}
		record(func() { tally.done++ })
	}
}

// backendSample is the warehouse's backends of the example sources at one
// moment: source -> set of backend PIDs.
type backendSample struct {
	at   time.Time
	pids map[string]map[string]bool
}

func sampleBackends() (backendSample, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", "-X", "-At", "-d", "postgres", "-c",
		"SELECT application_name || ' ' || pid FROM pg_stat_activity WHERE application_name LIKE 'shardpool/tenants/%'")
	cmd.Env = append(os.Environ(),
		"PGHOST="+os.Getenv("WAREHOUSE_PGHOST"), "PGPORT="+os.Getenv("WAREHOUSE_PGPORT"),
		"PGUSER="+os.Getenv("WAREHOUSE_PGUSER"), "PGPASSWORD="+os.Getenv("WAREHOUSE_PGPASSWORD"))
	raw, err := cmd.Output()
	if err != nil {
		return backendSample{}, err
	}
	out := strings.TrimSpace(string(raw))
	s := backendSample{at: time.Now(), pids: map[string]map[string]bool{}}
	for _, line := range strings.Split(out, "\n") {
		app, pid, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		parts := strings.Split(app, "/") // shardpool/<ns>/<name>/<shard>/<token>
		if len(parts) < 3 {
			continue
		}
		src := parts[1] + "/" + parts[2]
		if s.pids[src] == nil {
			s.pids[src] = map[string]bool{}
		}
		s.pids[src][pid] = true
	}
	return s, nil
}

// shardHashes is templateHashes without a *testing.T (for a goroutine).
func shardHashes(ctx context.Context, kc kubernetes.Interface) (map[string]string, error) {
	ds, err := kc.AppsV1().Deployments(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=shard"})
	if err != nil {
		return nil, err
	}
	h := map[string]string{}
	for _, d := range ds.Items {
		h[d.Name] = d.Annotations["shardpool.dev/template-hash"]
	}
	return h, nil
}

// podNames lists the names of the release's pods of a component.
func podNames(t *testing.T, component string) map[string]bool {
	t.Helper()
	pods, err := client(t).CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + component})
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, p := range pods.Items {
		m[p.Name] = true
	}
	return m
}

// `helm upgrade` with a new image tag under load replaces the operator,
// both routers and every shard. Clients follow the router Service's
// endpoints and retry once on 57P01 at an idle point, as BI backends'
// pools do: no query fails, no transaction fails once begun, and a
// source's server backends stay as they were until its own shard rolls.
func TestWholeReleaseUpgradeUnderLoad(t *testing.T) {
	_, pw := installed(t)
	helmSet(t, "router.replicas=2", "router.drainDelaySeconds=2", "router.terminationGracePeriodSeconds=12")
	t.Cleanup(func() {
		helmSet(t, "image.tag=local", "router.replicas=1", "router.drainDelaySeconds=5", "router.terminationGracePeriodSeconds=35")
		routersSettled(t, 1)
		eventually(t, 180*time.Second, "shards rolled back to the local tag", func() (bool, error) {
			return shardsSettled(t, len(templateHashes(t)), nil) == "", nil
		})
	})
	routersSettled(t, 2)
	hashes := templateHashes(t)
	assign := assignments(t, "tenants")
	before := map[string]map[string]bool{}
	for _, c := range []string{"operator", "router", "shard"} {
		before[c] = podNames(t, c)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	eps := followRouterEndpoints(ctx, t)
	connect := func(ctx context.Context, db string) (*pgx.Conn, error) {
		return routerConn(ctx, eps.pick(), pw, db)
	}
	sources := []string{"tenants.acme", "tenants.globex", "tenants.initech"}
	load := &fault.Load{Connect: connect, Query: "SELECT 1", Pause: 10 * time.Millisecond, Timeout: 20 * time.Second, RetryRestarting: true}
	load.Start(sources, 3)
	tally := &txTally{}
	var wg sync.WaitGroup
	for _, src := range sources {
		src := src
		wg.Add(1)
		go txClient(ctx, func(ctx context.Context) (*pgx.Conn, error) { return connect(ctx, src) }, tally, &wg)
	}

	// Sampled every 500 ms: each source's backends, and when each shard's
	// Deployment got the new template (its roll began).
	var samples []backendSample
	rollStart := map[string]time.Time{}
	sampling := make(chan struct{})
	kc := client(t)
	go func() {
		defer close(sampling)
		for ctx.Err() == nil {
			if s, err := sampleBackends(); err == nil {
				samples = append(samples, s)
			}
			if now, err := shardHashes(ctx, kc); err == nil {
				for d, h := range now {
					if _, seen := rollStart[d]; !seen && h != hashes[d] {
						rollStart[d] = time.Now()
					}
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(500 * time.Millisecond):
			}
		}
	}()
	time.Sleep(3 * time.Second)

	started := time.Now()
	helmSet(t, "image.tag=local-upgrade")
	eventually(t, 300*time.Second, "operator, routers and shards all replaced and settled", func() (bool, error) {
		if why := shardsSettled(t, len(hashes), hashes); why != "" {
			return false, nil
		}
		for _, c := range []string{"operator", "router", "shard"} {
			for name := range podNames(t, c) {
				if before[c][name] {
					return false, nil
				}
			}
		}
		return len(routersSettled(t, 2)) == 2, nil
	})
	took := time.Since(started)
	eventually(t, 60*time.Second, "example sources Ready", func() (bool, error) {
		for _, s := range assignments(t, "tenants") {
			if s[1] != "Ready" {
				return false, nil
			}
		}
		return true, nil
	})
	time.Sleep(3 * time.Second)
	cancel()
	wg.Wait()
	<-sampling
	report := load.Stop()

	t.Logf("whole-release upgrade (operator, 2 routers, %d shards) took %s; query load: %s", len(hashes), took.Round(time.Second), report.Summary())
	t.Logf("transactions: %d committed, %d retried once after 57P01 before BEGIN, %d failed before BEGIN, %d failed inside", tally.done, tally.retried, len(tally.before), len(tally.inside))
	if failed := report.Failed(); len(failed) > 0 {
		for i, f := range failed {
			if i == 5 {
				break
			}
			t.Logf("failed: %s %s: %s", f.Source, f.Code, f.Err)
		}
		t.Errorf("%d queries failed for clients that retry once on 57P01 (want 0)", len(failed))
	}
	if len(tally.inside) > 0 {
		t.Errorf("%d transactions failed once begun (want 0): %s", len(tally.inside), tally.inside[0])
	}
	if len(tally.before) > 0 {
		t.Errorf("%d transactions could not begin after one retry (want 0): %s", len(tally.before), tally.before[0])
	}
	if tally.done == 0 || report.Queries() == 0 {
		t.Fatalf("no load ran")
	}
	if len(report.Retries())+tally.retried == 0 {
		t.Errorf("no client was told to reconnect: the routers were not replaced under the load")
	}
	if silence, src := report.LongestSilence(); silence > 5*time.Second {
		t.Errorf("%s went %s without an answer (want under 5 s)", src, silence.Round(time.Millisecond))
	} else {
		t.Logf("longest stretch without an answer: %s (%s)", silence.Round(time.Millisecond), src)
	}

	// Until its shard began to roll, every backend a source had at the
	// start was still there: replacing the operator and the routers
	// touched no server connection.
	if len(samples) < 3 {
		t.Fatalf("only %d backend samples", len(samples))
	}
	first := samples[0]
	var untouched []string
	for src, pids := range first.pids {
		a, ok := assign[strings.TrimPrefix(src, "tenants/")]
		if !ok || !strings.HasPrefix(src, "tenants/") {
			continue
		}
		deploy := fmt.Sprintf("shardpool-shard-%s", a[0])
		until, rolled := rollStart[deploy]
		if !rolled {
			t.Errorf("%s's shard %s never rolled", src, deploy)
			continue
		}
		checked := 0
		for _, s := range samples {
			if !s.at.Before(until) {
				break
			}
			checked++
			for pid := range pids {
				if !s.pids[src][pid] {
					t.Errorf("%s lost backend %s at %s, before its shard began to roll (%s)", src, pid, s.at.Format("15:04:05.000"), until.Format("15:04:05.000"))
				}
			}
		}
		untouched = append(untouched, fmt.Sprintf("%s: %d backends kept over %d samples until %s rolled at +%.1f s", src, len(pids), checked, deploy, until.Sub(started).Seconds()))
	}
	sort.Strings(untouched)
	for _, u := range untouched {
		t.Log(u)
	}
	if len(untouched) == 0 {
		t.Errorf("no example source had backends at the start")
	}
	var errs []error
	for d := range hashes {
		if _, ok := rollStart[d]; !ok {
			errs = append(errs, fmt.Errorf("%s did not roll", d))
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Error(err)
	}
}
