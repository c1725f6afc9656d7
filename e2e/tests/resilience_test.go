package tests

import (
	"context"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// backendPids lists "application_name pid" of every shardpool server connection.
func backendPids(t *testing.T) []string {
	t.Helper()
	rows := strings.Split(warehouse(t, "postgres", "SELECT application_name || ' ' || pid FROM pg_stat_activity WHERE application_name LIKE 'shardpool/tenants/%' ORDER BY 1"), "\n")
	sort.Strings(rows)
	return rows
}

func deletePodsAndWait(t *testing.T, component string) {
	t.Helper()
	c := client(t)
	ctx := context.Background()
	sel := "app.kubernetes.io/component=" + component
	old, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CoreV1().Pods(systemNS).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{LabelSelector: sel}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, component+" replaced and Ready", func() (bool, error) {
		pods, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			return false, err
		}
		ready := 0
		for _, p := range pods.Items {
			for _, o := range old.Items {
				if o.UID == p.UID {
					return false, nil
				}
			}
			if _, ok := podReadySince(&p); ok {
				ready++
			}
		}
		return ready == len(old.Items), nil
	})
}

// Restarting the operator or the router leaves every server connection
// alone: the same backend PIDs before and after.
func TestControlPlaneRestartsLeavePoolsAlone(t *testing.T) {
	installed(t)
	// Start from a quiet state: no namespace of an earlier test still
	// terminating (its sources going away), then the same connections
	// twice, a second apart.
	eventually(t, 120*time.Second, "earlier test namespaces gone", func() (bool, error) {
		out, _, err := kubectl(t, "", "get", "namespaces", "-o", "jsonpath={range .items[*]}{.status.phase} {end}")
		return !strings.Contains(out, "Terminating"), err
	})
	var before []string
	eventually(t, 30*time.Second, "server connections stable", func() (bool, error) {
		a := backendPids(t)
		time.Sleep(time.Second)
		before = backendPids(t)
		return strings.Join(a, "\n") == strings.Join(before, "\n"), nil
	})
	if len(before) == 0 {
		t.Fatal("no shardpool connections to compare")
	}
	deletePodsAndWait(t, "operator")
	// One of the two replicas leads again.
	eventually(t, 40*time.Second, "an operator replica holds the leader Lease", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", systemNS, "get", "lease", "shardpool-operator", "-o", "jsonpath={.spec.holderIdentity}")
		return strings.HasPrefix(out, "shardpool-operator-"), err
	})
	time.Sleep(5 * time.Second) // a few reconcile passes
	deletePodsAndWait(t, "router")
	time.Sleep(2 * time.Second)
	after := backendPids(t)
	if strings.Join(before, "\n") != strings.Join(after, "\n") {
		t.Fatalf("server connections changed across operator and router restarts:\nbefore:\n%s\nafter:\n%s", strings.Join(before, "\n"), strings.Join(after, "\n"))
	}
	t.Logf("%d server connections kept their backend PIDs across operator and router restarts", len(before))
}

// A shard process killed with SIGKILL is replaced (its container restarts
// and takes the Lease back) and its sources answer again; meanwhile queries
// wait or fail with a retryable error, never hang.
func TestShardKilledIsReplaced(t *testing.T) {
	ip, pw := installed(t)
	c := client(t)
	ctx := context.Background()
	out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "acme", "-o", "jsonpath={.status.shard}")
	if err != nil {
		t.Fatal(err)
	}
	lease, err := c.CoordinationV1().Leases(systemNS).Get(ctx, "shardpool-shard-"+out, metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil {
		t.Fatalf("lease of shard %s: %v", out, err)
	}
	pod, err := c.CoreV1().Pods(systemNS).Get(ctx, *lease.Spec.HolderIdentity, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pid := containerPid(pod)
	if !processAlive(pid) {
		t.Fatalf("shard process %d not running", pid)
	}
	conn, err := pgxConn(t, ip, pw, "tenants.acme", pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	killed := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var back time.Duration
	attempts := 0
	for time.Since(killed) < 60*time.Second {
		attempts++
		qctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		start := time.Now()
		var n int
		err := conn.QueryRow(qctx, "SELECT count(*) FROM orders").Scan(&n)
		cancel()
		if took := time.Since(start); took > 12*time.Second {
			t.Fatalf("a query hung for %s during the shard's replacement", took)
		}
		if err == nil && n == 500 {
			back = time.Since(killed)
			break
		}
		if err != nil {
			code := sqlstate(err)
			if code != "" && !strings.HasPrefix(code, "08") && !strings.HasPrefix(code, "57") {
				t.Fatalf("non-retryable error during replacement: %v", err)
			}
			// The session may be gone with the shard: reconnect, as a client would.
			conn.Close(ctx)
			if conn, err = pgxConn(t, ip, pw, "tenants.acme", pgx.QueryExecModeSimpleProtocol); err != nil {
				if code := sqlstate(err); code != "" && !strings.HasPrefix(code, "08") && !strings.HasPrefix(code, "57") {
					t.Fatalf("non-retryable error reconnecting: %v", err)
				}
				time.Sleep(200 * time.Millisecond)
				conn, err = pgxConn(t, ip, pw, "tenants.acme", pgx.QueryExecModeSimpleProtocol)
				if err != nil {
					continue
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if back == 0 {
		t.Fatal("source did not answer within 60s of its shard being killed")
	}
	t.Logf("shard killed with SIGKILL: source answering again after %s (%d attempts)", back.Round(time.Millisecond), attempts)
	if back > 20*time.Second {
		t.Errorf("replacement took %s, more than the Lease duration (15s) plus warm-up", back)
	}
}
