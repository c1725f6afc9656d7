package tests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"shardpool.dev/e2e/fault"
)

// The fault-injection suite (DESIGN guarantees 1, 2, 5, 7, 10, 11): each
// row puts steady load through the router (several clients per source, each
// reconnecting after an error as a BI backend's pool does), injects one
// fault, and checks what must hold. pg_stat_activity is sampled every 50 ms
// for the whole suite; any sample in which one source has server
// connections from two shard processes fails it. Every row prints its
// figures, and the table is written to e2e/.state/faults.txt.

// faultsEnv is what the rows share.
type faultsEnv struct {
	h        *fault.Harness
	ns       string
	routerIP string
	opsPW    string
	whDSN    string
	owners   *fault.Owners
	bh       *fault.Proxy
	table    []string
}

// warehouse opens a direct connection to the warehouse as its admin role.
func (e *faultsEnv) warehouse(ctx context.Context) (*pgx.Conn, error) {
	return pgx.Connect(ctx, e.whDSN)
}

func (e *faultsEnv) connect(ctx context.Context, db string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=ops dbname=%s sslmode=disable connect_timeout=15", e.routerIP, db))
	if err != nil {
		return nil, err
	}
	cfg.Password = e.opsPW
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	return pgx.ConnectConfig(ctx, cfg)
}

// load starts 3 clients on each source, a query every 20 ms each; with
// many sources, 1 client each, a query every 50 ms.
func (e *faultsEnv) load(sources ...string) *fault.Load {
	clients, pause := 3, 20*time.Millisecond
	if len(sources) > 4 {
		clients, pause = 1, 50*time.Millisecond
	}
	l := &fault.Load{Connect: e.connect, Pause: pause, Timeout: 30 * time.Second}
	var dbs []string
	for _, s := range sources {
		dbs = append(dbs, e.ns+"."+s)
	}
	l.Start(dbs, clients)
	return l
}

func (e *faultsEnv) backends(t *testing.T) map[string][]int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	wh, err := e.warehouse(ctx)
	if err != nil {
		t.Fatalf("warehouse: %v", err)
	}
	defer wh.Close(context.Background())
	m, err := fault.Backends(ctx, wh, "shardpool/"+e.ns+"/")
	if err != nil {
		t.Fatalf("pg_stat_activity: %v", err)
	}
	return m
}

// holder returns the Lease holder (a pod name) of the shard serving
// `source`, and the pid of its container, 0 when the pod object is gone (an
// orphaned process keeps its Lease until it expires).
func (e *faultsEnv) holder(t *testing.T, source string) (string, int) {
	t.Helper()
	ctx := context.Background()
	out, _, err := kubectl(t, "", "-n", e.ns, "get", "datasource", source, "-o", "jsonpath={.status.shard}")
	if err != nil || out == "" {
		t.Fatalf("%s has no shard: %v", source, err)
	}
	lease, err := e.h.Kube.CoordinationV1().Leases(systemNS).Get(ctx, "shardpool-shard-"+out, metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil {
		t.Fatalf("lease of shard %s: %v", out, err)
	}
	pod, err := e.h.Kube.CoreV1().Pods(systemNS).Get(ctx, *lease.Spec.HolderIdentity, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return *lease.Spec.HolderIdentity, 0
	case err != nil:
		t.Fatal(err)
	}
	return pod.Name, containerPid(pod)
}

// settle waits until every source of the namespace is Ready with no
// connection of a second process, so a row starts from a quiet state.
func (e *faultsEnv) settle(t *testing.T) {
	t.Helper()
	eventually(t, 90*time.Second, "every fault source Ready", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", e.ns, "get", "datasources", "-o", `jsonpath={range .items[*]}{.metadata.name}={.status.phase} {end}`)
		if err != nil {
			return false, err
		}
		for _, f := range strings.Fields(out) {
			if !strings.HasSuffix(f, "=Ready") {
				return false, fmt.Errorf("%s", out)
			}
		}
		return out != "", nil
	})
}

// answering waits until a query through the router succeeds on each of
// `sources` (a status can say Ready while its shard's Lease is still held
// by a process that a previous row ended).
func (e *faultsEnv) answering(t *testing.T, sources []string) {
	t.Helper()
	for _, src := range sources {
		eventually(t, 90*time.Second, src+" answers through the router", func() (bool, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			conn, err := e.connect(ctx, e.ns+"."+src)
			if err != nil {
				return false, err
			}
			defer conn.Close(context.Background())
			_, err = conn.Exec(ctx, "SELECT 1")
			return err == nil, err
		})
	}
}

// row runs one fault under load on `sources` and records its figures.
func (e *faultsEnv) row(t *testing.T, name string, sources []string, inject func(t *testing.T) string, check func(t *testing.T, r fault.Report)) {
	t.Run(name, func(t *testing.T) {
		e.settle(t)
		e.answering(t, sources)
		l := e.load(sources...)
		time.Sleep(3 * time.Second)
		extra := inject(t)
		r := l.Stop()
		if len(r.Failed()) > 0 {
			for i, f := range r.Failed() {
				if i == 8 {
					break
				}
				t.Logf("failed: %s at %s after %s: %s %s", f.Source, f.Start.Format("15:04:05.000"), f.End.Sub(f.Start).Round(time.Millisecond), f.Code, f.Err)
			}
		}
		line := fmt.Sprintf("| %s | %s | %s |", name, r.Summary(), extra)
		t.Log(line)
		e.table = append(e.table, line)
		check(t, r)
	})
}

func sameBackends(t *testing.T, before, after map[string][]int) {
	t.Helper()
	if len(before) == 0 {
		t.Fatal("no server connections to compare")
	}
	if !reflect.DeepEqual(before, after) {
		t.Errorf("server backends changed:\nbefore %v\nafter  %v", before, after)
	}
}

// untouched is the check of a fault the data path must not notice: no
// failed query and no stretch over 1 s without an answer.
func untouched(t *testing.T, r fault.Report) {
	t.Helper()
	if n := len(r.Failed()); n > 0 {
		t.Errorf("%d queries failed", n)
	}
	if s, src := r.LongestSilence(); s > time.Second {
		t.Errorf("%s went %s without an answer", src, s)
	}
}

func onlyRetryable(t *testing.T, r fault.Report) {
	t.Helper()
	for code, n := range r.Codes() {
		if !strings.HasPrefix(code, "08") && !strings.HasPrefix(code, "57") {
			t.Errorf("%d failures with SQLSTATE %q: only 08xxx and 57Pxx may reach a client here", n, code)
		}
	}
}

func TestFaults(t *testing.T) {
	routerIP, _ := installed(t)
	c := client(t)
	h, err := fault.New(stateDir(), c)
	if err != nil {
		t.Fatal(err)
	}
	e := &faultsEnv{h: h, routerIP: routerIP, opsPW: opsPassword(t), ns: tempNamespace(t, c, "faults")}
	upstream := os.Getenv("WAREHOUSE_PGHOST") + ":" + os.Getenv("WAREHOUSE_PGPORT")
	if e.bh, err = h.WarehouseProxy("wh-"+e.ns, upstream); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.bh.Delete() })
	ctx := context.Background()
	e.whDSN = fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=postgres sslmode=disable connect_timeout=5",
		os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER"), os.Getenv("WAREHOUSE_PGPASSWORD"))

	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Secret\nmetadata: {name: wh, namespace: %s}\nstringData: {password: %q}\n", e.ns, os.Getenv("WAREHOUSE_PGPASSWORD"))
	source := func(name, host string, port int, pool string) {
		fmt.Fprintf(&b, "---\napiVersion: shardpool.dev/v1alpha1\nkind: DataSource\nmetadata: {name: %s, namespace: %s}\nspec: {host: %q, port: %d, database: acme, user: %s, passwordSecretRef: {name: wh, key: password}, tls: {mode: disable}, pool: {%s}}\n",
			name, e.ns, host, port, os.Getenv("WAREHOUSE_PGUSER"), pool)
	}
	whPort, _ := strconv.Atoi(os.Getenv("WAREHOUSE_PGPORT"))
	direct := "minIdle: 2, maxSize: 6, connectTimeout: 2s, acquireTimeout: 10s"
	source("f0", os.Getenv("WAREHOUSE_PGHOST"), whPort, direct)
	source("f1", os.Getenv("WAREHOUSE_PGHOST"), whPort, direct)
	source("bh", e.bh.Host, e.bh.Port, "minIdle: 2, maxSize: 6, connectTimeout: 2s, acquireTimeout: 3s, statementTimeout: 3s")
	var movers []string
	for i := 0; i < 16; i++ {
		movers = append(movers, fmt.Sprintf("m%02d", i))
		source(movers[i], os.Getenv("WAREHOUSE_PGHOST"), whPort, "minIdle: 1, maxSize: 3, connectTimeout: 2s, acquireTimeout: 10s")
	}
	// A source that the rescale 3 -> 4 surely moves (its preferred shard
	// among 4 is the new one): a transaction held open on it keeps its old
	// shard draining it while that shard is cut from the API server.
	held := ""
	for i := 0; i < 100 && held == ""; i++ {
		if name := fmt.Sprintf("h%02d", i); preferredShard(e.ns+"/"+name, 4) == 3 {
			held = name
		}
	}
	if held == "" {
		t.Fatal("no name h00-h99 prefers shard 3 among 4")
	}
	source(held, os.Getenv("WAREHOUSE_PGHOST"), whPort, "minIdle: 1, maxSize: 3, connectTimeout: 2s, acquireTimeout: 10s")
	if _, stderr, err := kubectl(t, b.String(), "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	e.owners = &fault.Owners{Prefix: "shardpool/" + e.ns + "/"}
	e.owners.Start(e.warehouse)
	defer func() {
		s := e.owners.Stop()
		t.Logf("pg_stat_activity sampled %d times every 50 ms (%d attempts failed, longest gap %s); most connections per source %v", s.Samples, s.Failed, s.Gap.Round(time.Millisecond), s.Most)
		if s.Err != nil {
			t.Errorf("sampling pg_stat_activity: %v", s.Err)
		}
		// The warehouse restart row stops it for 3 s; no other gap is allowed.
		if s.Gap > 8*time.Second {
			t.Errorf("pg_stat_activity went unsampled for %s", s.Gap)
		}
		if len(s.Violations) > 0 {
			t.Errorf("%d samples showed a source with two owners, e.g. %v", len(s.Violations), s.Violations[:min(len(s.Violations), 5)])
		}
		if s.Samples < 100 {
			t.Errorf("only %d samples of pg_stat_activity", s.Samples)
		}
		for src, n := range s.Most {
			if n > 6 {
				t.Errorf("%s had %d server connections, above its maxSize 6", src, n)
			}
		}
		table := "| fault | load through the router | figures |\n| --- | --- | --- |\n" + strings.Join(e.table, "\n") + "\n"
		_ = os.WriteFile(filepath.Join(stateDir(), "faults.txt"), []byte(table), 0o644)
		t.Logf("\n%s", table)
	}()
	e.settle(t)
	steady := []string{"f0", "f1"}

	e.row(t, "kube-apiserver hung (SIGSTOP) 45 s", steady, func(t *testing.T) string {
		before := e.backends(t)
		resume, err := h.HangAPIServer()
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(45 * time.Second)
		if err := resume(); err != nil {
			t.Fatal(err)
		}
		if err := h.WaitAPIReady(time.Minute); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		sameBackends(t, before, e.backends(t))
		caught, err := h.WaitControllersCaughtUp(e.ns, 3*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("same %d backends before and after; the cluster started a new pod again %s after the resume", count(before), (caught + 3*time.Second).Round(time.Second))
	}, untouched)

	e.row(t, "kube-apiserver stopped 45 s, then started", steady, func(t *testing.T) string {
		before := e.backends(t)
		start, err := h.StopAPIServer()
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(45 * time.Second)
		t0 := time.Now()
		if err := start(); err != nil {
			t.Fatal(err)
		}
		up := time.Since(t0)
		time.Sleep(3 * time.Second)
		sameBackends(t, before, e.backends(t))
		caught, err := h.WaitControllersCaughtUp(e.ns, 3*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("same %d backends; apiserver ready %s after its start; the cluster started a new pod again %s after it", count(before), up.Round(time.Millisecond), (up + 3*time.Second + caught).Round(time.Second))
	}, untouched)

	e.row(t, "one shard cut from the kube-apiserver 45 s", []string{"f0"}, func(t *testing.T) string {
		pod, _ := e.holder(t, "f0")
		before := e.backends(t)
		heal, err := h.FaultPodAPI(systemNS, pod, fault.Cut)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(45 * time.Second)
		if err := heal(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		sameBackends(t, before, e.backends(t))
		if p, _ := e.holder(t, "f0"); p != pod {
			t.Errorf("the shard lost its Lease to %s", p)
		}
		return fmt.Sprintf("%s kept its Lease and its %d backends", pod, count(before))
	}, func(t *testing.T, r fault.Report) {
		if n := len(r.Failed()); n > 0 {
			t.Errorf("%d queries failed", n)
		}
	})

	var orphanAt time.Time
	e.row(t, "shard orphaned, replacement started", []string{"f0"}, func(t *testing.T) string {
		pod, _ := e.holder(t, "f0")
		o, err := h.OrphanPod(ctx, systemNS, pod)
		if err != nil {
			t.Fatal(err)
		}
		defer o.Kill()
		orphanAt = time.Now()
		var successor string
		eventually(t, 60*time.Second, "a replacement pod holds the shard's Lease and serves f0", func() (bool, error) {
			p, _ := e.holder(t, "f0")
			if p == pod {
				return false, fmt.Errorf("still held by the orphan")
			}
			successor = p
			out, _, err := kubectl(t, "", "-n", e.ns, "get", "datasource", "f0", "-o", "jsonpath={.status.servedBy} {.status.phase}")
			return out == p+" Ready", err
		})
		time.Sleep(3 * time.Second)
		if !alive(o.Pid) {
			t.Errorf("the orphan (pid %d) died on its own; the fault did not hold", o.Pid)
		}
		return fmt.Sprintf("orphan %s (pid %d) kept running; %s took over", pod, o.Pid, successor)
	}, func(t *testing.T, r fault.Report) {
		onlyRetryable(t, r)
		if l := r.Longest(); l.End.Sub(l.Start) > 10*time.Second {
			t.Errorf("an attempt took %s (%s)", l.End.Sub(l.Start), l.Err)
		}
		back := r.FirstAnswerAfter(orphanAt.Add(15 * time.Second))
		t.Logf("first answer of a query sent after the Lease duration: %v after it", back)
		if d, ok := back[e.ns+".f0"]; !ok || d > 2*time.Second {
			t.Errorf("the replacement did not serve within the Lease duration + 2 s (%v)", back)
		}
	})

	var frozenAt time.Time
	e.row(t, "shard frozen (SIGSTOP) 30 s, then resumed", []string{"f0"}, func(t *testing.T) string {
		var pod string
		var pid int
		eventually(t, 60*time.Second, "f0 served by a pod that exists", func() (bool, error) {
			pod, pid = e.holder(t, "f0")
			return pid != 0, fmt.Errorf("the Lease holder %s has no pod", pod)
		})
		resume, err := fault.Freeze(pid)
		if err != nil {
			t.Fatal(err)
		}
		frozenAt = time.Now()
		time.Sleep(30 * time.Second)
		if err := resume(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		p, newPid := e.holder(t, "f0")
		return fmt.Sprintf("%s (pid %d) frozen; now served by %s pid %d", pod, pid, p, newPid)
	}, func(t *testing.T, r fault.Report) {
		onlyRetryable(t, r)
		if l := r.Longest(); l.End.Sub(l.Start) > 10*time.Second {
			t.Errorf("an attempt took %s (%s)", l.End.Sub(l.Start), l.Err)
		}
		if s, _ := r.LongestSilence(); s > 20*time.Second {
			t.Errorf("f0 went %s without an answer (at most 20 s after the freeze)", s)
		}
		t.Logf("answers again %v after the freeze", r.FirstAnswerAfter(frozenAt))
	})

	var restart struct{ signalled, stopped, ready time.Time }
	e.row(t, "warehouse PostgreSQL restarted (fast shutdown, down 3 s)", steady, func(t *testing.T) string {
		restart.signalled = time.Now()
		stopped, ready, err := h.RestartWarehouse(3*time.Second, os.Getenv("WAREHOUSE_PGPORT"))
		if err != nil {
			t.Fatal(err)
		}
		restart.stopped, restart.ready = stopped, ready
		time.Sleep(5 * time.Second)
		return fmt.Sprintf("down %s", ready.Sub(stopped).Round(time.Millisecond))
	}, func(t *testing.T, r fault.Report) {
		inFlight := 0
		for _, x := range r.Results {
			if !x.Reconnect && x.Start.Before(restart.stopped) && x.End.After(restart.signalled) {
				inFlight++
			}
		}
		failed := 0
		for _, f := range r.Failed() {
			if !f.Reconnect {
				failed++
			}
			if f.Code == "53300" {
				t.Errorf("a client was told 53300 (too many connections) during a restart: %s", f.Err)
			}
			if !strings.HasPrefix(f.Code, "08") && f.Code != "57P01" && f.Code != "57P03" {
				t.Errorf("failure with SQLSTATE %s: %s", f.Code, f.Err)
			}
		}
		t.Logf("%d queries failed, %d were in flight at the shutdown", failed, inFlight)
		if failed > inFlight {
			t.Errorf("%d queries failed, only %d were in flight at the shutdown: the others should have waited", failed, inFlight)
		}
		back := r.FirstAnswerAfter(restart.ready)
		for _, src := range steady {
			if d, ok := back[e.ns+"."+src]; !ok || d > 2*time.Second {
				t.Errorf("%s answered %v after the warehouse accepted connections (at most 2 s)", src, d)
			}
		}
		// Back to minIdle and never above maxSize (the sampler checks the bound).
		eventually(t, 20*time.Second, "pools back at minIdle or more", func() (bool, error) {
			m := e.backends(t)
			for _, src := range steady {
				if n := len(m[e.ns+"/"+src]); n < 2 || n > 6 {
					return false, fmt.Errorf("%s has %d connections", src, n)
				}
			}
			return true, nil
		})
	})

	// A spec change rebuilds the pool on the same shard: the old pool
	// drains (57P01 to the router for what it has not run) and the router
	// re-attaches to the same shard, which still owns the source.
	var specIdle struct {
		took time.Duration
		err  error
	}
	e.row(t, "DataSource spec changed (pool rebuilt on its shard)", []string{"f1"}, func(t *testing.T) string {
		idle, err := e.connect(ctx, e.ns+".f1")
		if err != nil {
			t.Fatal(err)
		}
		defer idle.Close(ctx)
		if _, err := idle.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		before := e.backends(t)[e.ns+"/f1"]
		if _, stderr, err := kubectl(t, "", "-n", e.ns, "patch", "datasource", "f1", "--type=merge", "-p", `{"spec":{"pool":{"idleTimeout":"9m"}}}`); err != nil {
			t.Fatalf("patch: %v\n%s", err, stderr)
		}
		eventually(t, 30*time.Second, "f1's pool rebuilt (none of its old backends left)", func() (bool, error) {
			now := e.backends(t)[e.ns+"/f1"]
			for _, p := range now {
				for _, b := range before {
					if p == b {
						return false, fmt.Errorf("old backend %d still there", p)
					}
				}
			}
			return len(now) > 0, nil
		})
		t0 := time.Now()
		qctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		_, specIdle.err = idle.Exec(qctx, "SELECT 2")
		specIdle.took = time.Since(t0)
		return fmt.Sprintf("backends %v replaced; a client idle through the change answered in %s", before, specIdle.took.Round(time.Millisecond))
	}, func(t *testing.T, r fault.Report) {
		if specIdle.err != nil || specIdle.took > 2*time.Second {
			t.Errorf("a client idle through the spec change: %v after %s", specIdle.err, specIdle.took)
		}
		if n := len(r.Failed()); n > 0 {
			t.Errorf("%d queries failed during the rebuild", n)
		}
		if l := r.Longest(); l.End.Sub(l.Start) > 2*time.Second {
			t.Errorf("a query took %s during the rebuild", l.End.Sub(l.Start))
		}
	})

	var healedAt time.Time
	e.row(t, "warehouse blackholed 20 s", []string{"bh"}, func(t *testing.T) string {
		if err := e.bh.Blackhole(); err != nil {
			t.Fatal(err)
		}
		blackholed := time.Now()
		var degraded string
		eventually(t, 19*time.Second, "bh Degraded with a lastError", func() (bool, error) {
			out, _, err := kubectl(t, "", "-n", e.ns, "get", "datasource", "bh", "-o", "jsonpath={.status.phase}|{.status.lastError}")
			degraded = out
			return strings.HasPrefix(out, "Degraded|") && len(out) > len("Degraded|"), err
		})
		time.Sleep(time.Until(blackholed.Add(20 * time.Second)))
		if err := e.bh.Heal(); err != nil {
			t.Fatal(err)
		}
		healedAt = time.Now()
		var readyIn time.Duration
		eventually(t, 30*time.Second, "bh Ready again", func() (bool, error) {
			out, _, err := kubectl(t, "", "-n", e.ns, "get", "datasource", "bh", "-o", "jsonpath={.status.phase}")
			readyIn = time.Since(healedAt)
			return out == "Ready", err
		})
		if readyIn > 5*time.Second {
			t.Errorf("Ready %s after the network healed (at most 5 s)", readyIn)
		}
		time.Sleep(2 * time.Second)
		return fmt.Sprintf("status during: %q; Ready %s after healing", strings.Replace(degraded, "|", ": ", 1), readyIn.Round(time.Millisecond))
	}, func(t *testing.T, r fault.Report) {
		for _, f := range r.Failed() {
			if !strings.HasPrefix(f.Code, "08") && f.Code != "57014" {
				t.Errorf("failure with SQLSTATE %s (want 08xxx or 57014): %s", f.Code, f.Err)
			}
		}
		// statementTimeout 3 s (+2 s for the shard to give up on a silent
		// server), acquireTimeout 3 s: nothing may take much longer.
		if l := r.Longest(); l.End.Sub(l.Start) > 7*time.Second {
			t.Errorf("an attempt took %s during the blackhole (%s)", l.End.Sub(l.Start), l.Err)
		}
		if len(r.Failed()) == 0 {
			t.Error("no query failed while the warehouse was unreachable: the fault did not hold")
		}
		t.Logf("first answer after healing: %v", r.FirstAnswerAfter(healedAt))
	})

	// Rescale 3 -> 4 while every source that moves is under load: the old
	// shard drains, closes and acknowledges, and only then the new one opens.
	helmSet(t, "shard.count=3")
	t.Cleanup(func() { helmSet(t, "shard.count=2") })
	// Sources move to shard 2 only once it holds its Lease; the assignment
	// read as "before" must be the one among 3 shards, not the one the
	// operator had when helm returned.
	shardsUp(t, 3)
	before := e.shardsOf(t)
	all := append(append([]string{}, steady...), movers...)
	var moved []string
	// Release notes the new shard heard from the old ones through the
	// routers, and the sources it opened on one before the API server
	// showed the hand-over (fewer when the API server is quick: then its
	// watch may show the hand-over write as soon as the note arrives).
	notes := func(outcome string) float64 {
		v, _ := shardMetric(t, "shardpool_shard_release_notes_total", map[string]string{"outcome": outcome})
		return v
	}
	heardBefore, openedBefore := notes("heard"), notes("opened")
	var heard, onNote float64
	// The held source: its old shard tells its release over the links and
	// is then cut from the API server before its hand-over write; the new
	// shard, which opened the source on the note, must report it Ready on
	// its own once the old shard's Lease has expired.
	var heldOut struct {
		pod              string
		query, reported  time.Duration
		queryErr, status string
	}
	e.row(t, "rescale 3 -> 4 shards, every source under load", all, func(t *testing.T) string {
		heldOut.pod, _ = e.holder(t, held)
		oldShard := before[held]
		tx, err := e.connect(ctx, e.ns+"."+held)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Close(ctx)
		if _, err := tx.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		helmSet(t, "shard.count=4")
		shardsUp(t, 4)
		// Every other source settled among 4 shards; the held one assigned
		// to shard 3 and still served by its old shard, which drains it.
		eventually(t, 40*time.Second, "every source but "+held+" settled, "+held+" draining on shard "+oldShard, func() (bool, error) {
			if _, why := settledExcept(t, e.ns, held); why != "" {
				return false, fmt.Errorf("%s", why)
			}
			a := assignments(t, e.ns)[held]
			return a[0] == "3" && a[2] == oldShard, fmt.Errorf("%s: shard %s, phase %s, servingShard %s", held, a[0], a[1], a[2])
		})
		heal, err := h.FaultPodAPI(systemNS, heldOut.pod, fault.Cut)
		if err != nil {
			t.Fatal(err)
		}
		healed := false
		defer func() {
			if !healed {
				_ = heal()
			}
		}()
		// The transaction ends: the old shard closes the source's last
		// connection and tells the routers; its write cannot reach the API
		// server. The session's next query goes to the new owner.
		if _, err := tx.Exec(ctx, "COMMIT"); err != nil {
			t.Fatalf("COMMIT on the draining shard: %v", err)
		}
		committed := time.Now()
		qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err = tx.Exec(qctx, "SELECT 1")
		cancel()
		heldOut.query = time.Since(committed)
		if err != nil {
			heldOut.queryErr = err.Error()
		}
		// Ready on shard 3 while the old shard is still cut off: reported
		// by the new owner once the old one's Lease (15 s) has expired.
		deadline := time.Now().Add(45 * time.Second)
		for time.Now().Before(deadline) {
			a := assignments(t, e.ns)[held]
			heldOut.status = fmt.Sprintf("shard %s, phase %s, servingShard %s", a[0], a[1], a[2])
			if a[0] == "3" && a[1] == "Ready" && a[2] == "3" {
				heldOut.reported = time.Since(committed)
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		healed = true
		if err := heal(); err != nil {
			t.Fatal(err)
		}
		after := e.shardsOf(t)
		for name, s := range after {
			if s != before[name] {
				moved = append(moved, name)
				if s != "3" {
					t.Errorf("%s moved from shard %s to %s, not to the new shard 3", name, before[name], s)
				}
			}
		}
		time.Sleep(2 * time.Second)
		heard, onNote = notes("heard")-heardBefore, notes("opened")-openedBefore
		t.Logf("%s: old shard %s cut from the API server after its release note; the session's next query answered %s after COMMIT (%s); Ready on shard 3 %s after COMMIT (last seen: %s)",
			held, heldOut.pod, heldOut.query.Round(time.Millisecond), heldOut.queryErr, heldOut.reported.Round(time.Millisecond), heldOut.status)
		return fmt.Sprintf("%d of %d sources moved to shard 3; %.0f release notes heard, %.0f opened on one; %s, its old shard cut from the API server before its hand-over write: next query %s after COMMIT, Ready on shard 3 after %s",
			len(moved), len(after), heard, onNote, held, heldOut.query.Round(time.Millisecond), heldOut.reported.Round(100*time.Millisecond))
	}, func(t *testing.T, r fault.Report) {
		if heldOut.queryErr != "" {
			t.Errorf("%s: the query after COMMIT failed: %s", held, heldOut.queryErr)
		}
		if heldOut.reported == 0 {
			t.Errorf("%s was not reported Ready on shard 3 within 45 s while its old shard %s, cut from the API server, could not write the hand-over (%s)", held, heldOut.pod, heldOut.status)
		}
		if len(moved) == 0 {
			t.Error("no source moved: nothing was tested")
		}
		// Each moved source is under load, so its old shard has router
		// links to tell, and the routers pass the note on (a note that
		// finds shard 3 not yet in a router's routing table is dropped:
		// the API server still carries the news).
		if len(moved) > 0 && heard < 1 {
			t.Errorf("shard 3 heard no release note through the routers for %d moved sources", len(moved))
		}
		if n := len(r.Failed()); n > 0 {
			t.Errorf("%d queries failed during the rescale", n)
		}
	})

	// A transaction longer than the drain deadline: the shard ends it (and
	// says so in an Event) before it releases its Lease.
	helmSet(t, "shard.terminationGracePeriodSeconds=10")
	t.Cleanup(func() { helmSet(t, "shard.terminationGracePeriodSeconds=60") })
	eventually(t, 3*time.Minute, "every shard rolled to a 10 s grace period", func() (bool, error) {
		pods, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=shard"})
		if err != nil {
			return false, err
		}
		for _, p := range pods.Items {
			if p.Spec.TerminationGracePeriodSeconds == nil || *p.Spec.TerminationGracePeriodSeconds != 10 || p.DeletionTimestamp != nil {
				return false, fmt.Errorf("%s not rolled yet", p.Name)
			}
		}
		return len(pods.Items) > 0, nil
	})
	var longTx struct {
		code    string
		err     string
		ended   time.Duration
		release time.Time
		lastOld time.Time
	}
	e.row(t, "drain deadline exceeded (a transaction longer than the grace period)", steady, func(t *testing.T) string {
		pod, _ := e.holder(t, "f0")
		owners := e.owners.Owning(e.ns + "/f0")
		if len(owners) != 1 {
			t.Fatalf("f0 owned by %v", owners)
		}
		shard := strings.SplitN(owners[0], "/", 2)[0]
		tx, err := e.connect(ctx, e.ns+".f0")
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Close(ctx)
		if _, err := tx.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		// A report query that outlives the 10 s grace period (drain deadline 5 s).
		long := make(chan error, 1)
		go func() {
			_, err := tx.Exec(ctx, "SELECT pg_sleep(60)")
			long <- err
		}()
		time.Sleep(500 * time.Millisecond)
		deleted := time.Now()
		if err := c.CoreV1().Pods(systemNS).Delete(ctx, pod, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// Watch the Lease: when does it leave the draining pod?
		var holder string
		eventually(t, 30*time.Second, "the draining shard released its Lease", func() (bool, error) {
			l, err := c.CoordinationV1().Leases(systemNS).Get(ctx, "shardpool-shard-"+shard, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != pod {
				longTx.release = time.Now()
				if l.Spec.HolderIdentity != nil {
					holder = *l.Spec.HolderIdentity
				}
				return true, nil
			}
			return false, nil
		})
		// The shard ended the long transaction.
		select {
		case err := <-long:
			longTx.code, longTx.err = sqlstate(err), fmt.Sprint(err)
		case <-time.After(10 * time.Second):
			longTx.err = "no answer 10 s after the Lease was released"
		}
		longTx.lastOld = e.owners.LastSeen(e.ns+"/f0", owners[0])
		var events string
		eventually(t, 30*time.Second, "an Event says the drain ended a transaction", func() (bool, error) {
			out, _, err := kubectl(t, "", "-n", e.ns, "get", "events", "--field-selector", "reason=DrainDeadlineExceeded,involvedObject.name=f0", "-o", "jsonpath={range .items[*]}{.note}{.message}{end}")
			events = out
			return strings.Contains(out, "ended 1 server connection"), err
		})
		longTx.ended = longTx.release.Sub(deleted)
		t.Logf("%s (shard %s) deleted at %s; Lease holder %q at %s; old owner %s last seen at %s; query: %s",
			pod, shard, deleted.Format("15:04:05.000"), holder, longTx.release.Format("15:04:05.000"), owners[0], longTx.lastOld.Format("15:04:05.000"), longTx.err)
		return fmt.Sprintf("the query in the transaction ended with %s; Lease released %s after SIGTERM; Event: %q", longTx.code, longTx.ended.Round(time.Millisecond), events)
	}, func(t *testing.T, r fault.Report) {
		if longTx.code != "57P01" {
			t.Errorf("the transaction past the deadline ended with %q (%s), want 57P01", longTx.code, longTx.err)
		}
		if longTx.ended < 5*time.Second {
			t.Errorf("the Lease left the draining pod %s after SIGTERM, before the 5 s drain deadline", longTx.ended)
		}
		if longTx.lastOld.IsZero() || !longTx.lastOld.Before(longTx.release) {
			t.Errorf("the old shard's connection was seen at %s, after its Lease was released (%s)", longTx.lastOld.Format("15:04:05.000"), longTx.release.Format("15:04:05.000"))
		}
		onlyRetryable(t, r)
	})
}

// shardsOf maps each source of the namespace to its shard, once every
// source is Ready on the shard it is assigned to (servingShard = shard).
func (e *faultsEnv) shardsOf(t *testing.T) map[string]string {
	t.Helper()
	var shards map[string]string
	eventually(t, 120*time.Second, "every fault source Ready on its assigned shard", func() (bool, error) {
		var why string
		if shards, why = settled(t, e.ns); why != "" {
			return false, fmt.Errorf("%s", why)
		}
		return len(shards) > 0, nil
	})
	return shards
}

func count(m map[string][]int) int {
	n := 0
	for _, v := range m {
		n += len(v)
	}
	return n
}

func alive(pid int) bool {
	return processAlive(pid)
}
