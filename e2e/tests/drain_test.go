package tests

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// SIGTERM under load (the pod deleted, as in a node drain): transactions
// that started before it all finish (pgbench's TPC-B-like transactions,
// BEGIN..END, through the router: zero failed), the process exits well
// within its grace period having finished every transaction, and it
// releases the Lease so the next pod takes over without waiting for expiry.
func TestShardSIGTERMUnderLoad(t *testing.T) {
	ip, pw := installed(t)
	c := client(t)
	ctx := context.Background()
	bench := ensureBenchSource(t)
	k, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "bench", "-o", "jsonpath={.status.shard}")
	if err != nil || k == "" {
		t.Fatalf("bench has no shard: %v", err)
	}
	leaseName := "shardpool-shard-" + k
	lease, err := c.CoordinationV1().Leases(systemNS).Get(ctx, leaseName, metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil {
		t.Fatalf("lease %s: %v", leaseName, err)
	}
	holder := *lease.Spec.HolderIdentity
	pod, err := c.CoreV1().Pods(systemNS).Get(ctx, holder, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pid := containerPid(pod)
	grace := int64(60)
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = *pod.Spec.TerminationGracePeriodSeconds
	}

	pgbenchDone := backgroundPgbench(t, ip, pw, "-M", "extended", "-c", "6", "-j", "2", "-T", "15", "-n", bench)
	time.Sleep(4 * time.Second)

	deleted := time.Now()
	if err := c.CoreV1().Pods(systemNS).Delete(ctx, holder, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	var exited, handed time.Duration
	var next string
	for time.Since(deleted) < time.Duration(grace+10)*time.Second && (exited == 0 || handed == 0) {
		if exited == 0 && !processAlive(pid) {
			exited = time.Since(deleted)
		}
		if handed == 0 {
			l, err := c.CoordinationV1().Leases(systemNS).Get(ctx, leaseName, metav1.GetOptions{})
			if err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity != "" && *l.Spec.HolderIdentity != holder {
				handed = time.Since(deleted)
				next = *l.Spec.HolderIdentity
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if exited == 0 {
		t.Fatalf("shard process %d still running %ds after SIGTERM (grace %ds)", pid, grace+10, grace)
	}
	if handed == 0 {
		t.Fatalf("lease %s not taken over after SIGTERM", leaseName)
	}
	t.Logf("SIGTERM under load: process exited after %.2fs (grace %ds); %s took the lease after %.2fs", exited.Seconds(), grace, next, handed.Seconds())
	if exited > time.Duration(grace)*time.Second {
		t.Errorf("exit took %s, beyond the grace period", exited)
	}
	// Released, not expired: the successor got it well before the 15 s Lease duration.
	if handed > 10*time.Second {
		t.Errorf("the successor took the lease after %s: it waited for expiry instead of a release", handed)
	}
	logf := filepath.Join(stateDir(), "logs", systemNS+"_"+holder+".log")
	logb, err := os.ReadFile(logf)
	if err != nil {
		t.Fatalf("shard log: %v", err)
	}
	if !regexp.MustCompile(`drained; exiting.*ended=0`).Match(logb) {
		t.Errorf("the shard did not report finishing every transaction before exiting (log %s)", logf)
	}
	if !strings.Contains(string(logb), "lease released") {
		t.Errorf("the shard did not release its lease (log %s)", logf)
	}

	n := pgbenchDone(time.Minute, "across the SIGTERM")
	t.Logf("pgbench across the SIGTERM: %s transactions, 0 failed", n)
	eventually(t, 60*time.Second, "bench served by the successor and Ready", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "bench", "-o", "jsonpath={.status.servedBy}|{.status.phase}")
		return out == next+"|Ready", err
	})
}
