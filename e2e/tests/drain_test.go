package tests

import (
	"context"
	"os"
	"os/exec"
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

	load, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	pgbench := exec.CommandContext(load, "pgbench", "-h", ip, "-p", "5432", "-U", "bi", "-M", "extended", "-c", "6", "-j", "2", "-T", "15", "-n", bench)
	pgbench.Env = append(os.Environ(), "PGPASSWORD="+pw)
	var pgout strings.Builder
	pgbench.Stdout, pgbench.Stderr = &pgout, &pgout
	if err := pgbench.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- pgbench.Wait() }()
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
	if !regexp.MustCompile(`drained; exiting.*unfinished=0`).Match(logb) {
		t.Errorf("the shard did not report finishing every transaction before exiting (log %s)", logf)
	}
	if !strings.Contains(string(logb), "lease released") {
		t.Errorf("the shard did not release its lease (log %s)", logf)
	}

	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("pgbench: %v\n%s", err, pgout.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("pgbench did not finish")
	}
	res := pgout.String()
	if !strings.Contains(res, "number of failed transactions: 0 ") {
		t.Fatalf("transactions failed across the SIGTERM:\n%s", res)
	}
	m := regexp.MustCompile(`number of transactions actually processed: (\d+)`).FindStringSubmatch(res)
	if m == nil {
		t.Fatalf("no pgbench summary:\n%s", res)
	}
	t.Logf("pgbench across the SIGTERM: %s transactions, 0 failed", m[1])
	eventually(t, 60*time.Second, "bench served by the successor and Ready", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "bench", "-o", "jsonpath={.status.servedBy}|{.status.phase}")
		return out == next+"|Ready", err
	})
}
