package tests

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"shardpool.dev/e2e/fault"
)

// routerEndpoints follows the addresses that the router Service's
// endpoints hold, as DNS or a proxy in front of the Service would: a
// client that (re)connects picks one of them. The local cluster's pods
// have loopback addresses, which the API server does not accept in an
// EndpointSlice, so the set is derived from the router pods as the
// EndpointSlice controller derives it: Ready and not terminating.
type routerEndpoints struct {
	mu    sync.Mutex
	ready []string
	next  atomic.Uint64
}

// followRouterEndpoints polls the router pods every 300 ms until ctx ends.
func followRouterEndpoints(ctx context.Context, t *testing.T) *routerEndpoints {
	t.Helper()
	c := client(t)
	e := &routerEndpoints{}
	poll := func() {
		pods, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=router"})
		if err != nil {
			return
		}
		var ready []string
		for i := range pods.Items {
			p := &pods.Items[i]
			if _, ok := podReadySince(p); ok && p.DeletionTimestamp == nil && p.Status.PodIP != "" {
				ready = append(ready, p.Status.PodIP)
			}
		}
		e.mu.Lock()
		e.ready = ready
		e.mu.Unlock()
	}
	poll()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(300 * time.Millisecond):
				poll()
			}
		}
	}()
	return e
}

// pick returns the next ready address, round-robin ("" when none).
func (e *routerEndpoints) pick() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.ready) == 0 {
		return ""
	}
	return e.ready[e.next.Add(1)%uint64(len(e.ready))]
}

// count is how many addresses are ready.
func (e *routerEndpoints) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.ready)
}

// routersSettled waits until the router Deployment has rolled out `n`
// Ready replicas and nothing else (no pod terminating) and returns their
// IPs.
func routersSettled(t *testing.T, n int) []string {
	t.Helper()
	c := client(t)
	var ips []string
	eventually(t, 150*time.Second, fmt.Sprintf("%d router pods rolled out and Ready", n), func() (bool, error) {
		d, err := c.AppsV1().Deployments(systemNS).Get(context.Background(), "shardpool-router", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		s := d.Status
		if d.Generation != s.ObservedGeneration || int(s.UpdatedReplicas) != n || int(s.ReadyReplicas) != n || int(s.Replicas) != n {
			return false, nil
		}
		pods, err := c.CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=router"})
		if err != nil {
			return false, err
		}
		ips = nil
		for _, p := range pods.Items {
			if p.DeletionTimestamp != nil {
				return false, nil
			}
			if _, ok := podReadySince(&p); ok {
				ips = append(ips, p.Status.PodIP)
			}
		}
		return len(ips) == n, nil
	})
	return ips
}

func routerConn(ctx context.Context, ip, password, db string) (*pgx.Conn, error) {
	if ip == "" {
		return nil, fmt.Errorf("no ready router endpoint")
	}
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=bi dbname=%s sslmode=disable connect_timeout=5", ip, db))
	if err != nil {
		return nil, err
	}
	cfg.Password = password
	return pgx.ConnectConfig(ctx, cfg)
}

// A router pod deleted under load drains: it leaves the Service's
// endpoints and serves on for drainDelaySeconds, then every session ends
// at its next idle point with 57P01, a transaction in progress finishes
// first, and one still open at the deadline is ended with 57P01. Clients
// that follow the endpoints and retry once on 57P01 see no failure.
func TestRouterDrainUnderLoad(t *testing.T) {
	_, pw := installed(t)
	helmSet(t, "router.replicas=2", "router.drainDelaySeconds=2", "router.terminationGracePeriodSeconds=12")
	t.Cleanup(func() {
		helmSet(t, "router.replicas=1", "router.drainDelaySeconds=5", "router.terminationGracePeriodSeconds=35")
		routersSettled(t, 1)
	})
	ips := routersSettled(t, 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	eps := followRouterEndpoints(ctx, t)
	eventually(t, 30*time.Second, "both routers Ready", func() (bool, error) {
		return eps.count() == 2, nil
	})
	victim := ips[0]
	var victimPod string
	pods, err := client(t).CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=router"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if p.Status.PodIP == victim {
			victimPod = p.Name
		}
	}

	load := &fault.Load{
		Connect: func(ctx context.Context, db string) (*pgx.Conn, error) {
			return routerConn(ctx, eps.pick(), pw, db)
		},
		Query:           "SELECT 1",
		Pause:           10 * time.Millisecond,
		Timeout:         20 * time.Second,
		RetryRestarting: true,
	}
	load.Start([]string{"tenants.acme", "tenants.globex", "tenants.initech"}, 4)

	// On the victim: a transaction in progress when the drain begins, and
	// one left open past the deadline.
	finishing, err := routerConn(context.Background(), victim, pw, "tenants.acme")
	if err != nil {
		t.Fatal(err)
	}
	defer finishing.Close(context.Background())
	stuck, err := routerConn(context.Background(), victim, pw, "tenants.globex")
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close(context.Background())
	if _, err := stuck.Exec(context.Background(), "BEGIN; SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if _, err := finishing.Exec(context.Background(), "BEGIN"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)

	deleted := time.Now()
	if _, stderr, err := kubectl(t, "", "-n", systemNS, "delete", "pod", victimPod, "--wait=false"); err != nil {
		t.Fatalf("delete router pod: %v\n%s", err, stderr)
	}
	// Still inside its transaction while the router drains: it finishes.
	var slept string
	txErr := finishing.QueryRow(context.Background(), "SELECT pg_sleep(3)::text").Scan(&slept)
	if txErr == nil {
		_, txErr = finishing.Exec(context.Background(), "COMMIT")
	}
	committed := time.Since(deleted)
	_, afterErr := finishing.Exec(context.Background(), "SELECT 1")

	// Past the deadline (2 s delay + 5 s), the open transaction is ended.
	time.Sleep(time.Until(deleted.Add(9 * time.Second)))
	_, stuckErr := stuck.Exec(context.Background(), "SELECT 1")

	routersSettled(t, 2)
	time.Sleep(3 * time.Second)
	report := load.Stop()
	t.Logf("router drain under load (12 clients over 2 routers, one router deleted): %s", report.Summary())

	if txErr != nil {
		t.Errorf("a transaction in progress when the router began draining failed: %v", txErr)
	} else {
		t.Logf("transaction in progress committed %.1f s after the delete", committed.Seconds())
	}
	if sqlstate(afterErr) != "57P01" || !strings.Contains(afterErr.Error(), "router is restarting") {
		t.Errorf("after its transaction the session should have ended with 57P01 (router restarting), got %v", afterErr)
	}
	if sqlstate(stuckErr) != "57P01" || !strings.Contains(stuckErr.Error(), "drain deadline") {
		t.Errorf("a transaction open past the drain deadline should end with 57P01 naming the deadline, got %v", stuckErr)
	}
	if failed := report.Failed(); len(failed) > 0 {
		for i, f := range failed {
			if i == 5 {
				break
			}
			t.Logf("failed: %s %s after %s: %s", f.Source, f.Code, f.End.Sub(f.Start).Round(time.Millisecond), f.Err)
		}
		t.Errorf("%d queries failed for clients that retry once on 57P01 (want 0)", len(failed))
	}
	retries := report.Retries()
	if len(retries) == 0 {
		t.Errorf("no client of the deleted router was told to reconnect (57P01): the drain did not happen")
	}
	for _, r := range retries {
		if !strings.Contains(r.RetryErr, "router is restarting") {
			t.Errorf("a client was closed with something else than the router's 57P01: %s", r.RetryErr)
			break
		}
	}
	if silence, src := report.LongestSilence(); silence > 3*time.Second {
		t.Errorf("%s went %s without an answer (want under 3 s)", src, silence.Round(time.Millisecond))
	}
}
