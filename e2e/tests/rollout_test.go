package tests

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// connectionOwners maps every warehouse connection of a shardpool source to
// the pid of the process holding its client end (via ss), and returns, per
// source (<ns>/<name>), the set of owning pids.
func connectionOwners(t *testing.T) map[string]map[int]bool {
	t.Helper()
	out, err := exec.Command("ss", "-tnpH", "state", "established", "( dport = :"+os.Getenv("WAREHOUSE_PGPORT")+" )").Output()
	if err != nil {
		t.Fatalf("ss: %v", err)
	}
	portPid := map[string]int{}
	re := regexp.MustCompile(`127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:\d+\s+users:\(\("[^"]*",pid=(\d+)`)
	for _, m := range re.FindAllStringSubmatch(string(out), -1) {
		pid, _ := strconv.Atoi(m[2])
		portPid[m[1]] = pid
	}
	rows := warehouse(t, "postgres", "SELECT application_name || ' ' || client_port FROM pg_stat_activity WHERE application_name LIKE 'shardpool/%'")
	owners := map[string]map[int]bool{}
	for _, line := range strings.Split(rows, "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		pid, ok := portPid[f[1]]
		if !ok {
			continue // closing right now
		}
		src, _, _, ok := appOwner(f[0])
		if !ok {
			continue
		}
		if owners[src] == nil {
			owners[src] = map[int]bool{}
		}
		owners[src][pid] = true
	}
	return owners
}

// Changing the shard template (`helm upgrade --set-string
// shard.podAnnotations.rev=N`) rolls the shards one at a time under a
// steady pgbench load through the router, with zero failed transactions,
// and no source ever has server connections from two processes.
func TestShardRolloutUnderLoad(t *testing.T) {
	ip, pw := installed(t)
	c := client(t)
	ctx := context.Background()
	bench := ensureBenchSource(t)

	// Steady load for the whole rollout.
	pgbenchDone := backgroundPgbench(t, ip, pw, "-M", "extended", "-c", "4", "-j", "2", "-T", "45", "-n", "-P", "5", bench)
	time.Sleep(3 * time.Second)

	before := templateHashes(t)

	rev := strconv.FormatInt(time.Now().Unix(), 10)
	helm := filepath.Join(repoRoot(), "e2e", ".bin", "helm")
	out, err := exec.Command(helm, "--kubeconfig", os.Getenv("KUBECONFIG"), "upgrade", "shardpool", filepath.Join(repoRoot(), "charts", "shardpool"),
		"-n", systemNS, "--reuse-values", "--set-string", "shard.podAnnotations.rev="+rev, "--timeout", "120s").CombinedOutput()
	if err != nil {
		t.Fatalf("helm upgrade: %v\n%s", err, out)
	}

	// Sample until every shard runs the new template and is settled.
	var mu sync.Mutex
	var overlaps []string
	maxRolling := 0
	rolled := map[string]time.Time{}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		for src, pids := range connectionOwners(t) {
			if len(pids) > 1 {
				mu.Lock()
				overlaps = append(overlaps, fmt.Sprintf("%s held by pids %v", src, pids))
				mu.Unlock()
			}
		}
		ds, err := c.AppsV1().Deployments(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=shard"})
		if err != nil {
			t.Fatal(err)
		}
		rolling, settled := 0, 0
		for _, d := range ds.Items {
			changed := d.Annotations["shardpool.dev/template-hash"] != before[d.Name]
			if changed && rolled[d.Name].IsZero() {
				rolled[d.Name] = time.Now()
				// Every shard updated before this one must have fully taken
				// over: its new pod holds the Lease and serves its sources.
				for other := range rolled {
					if other != d.Name {
						if why := takenOver(t, other); why != "" {
							t.Errorf("%s was updated while %s had not taken over: %s", d.Name, other, why)
						}
					}
				}
			}
			if changed && !deploymentSettled(&d) {
				rolling++
			}
			if changed && deploymentSettled(&d) {
				settled++
			}
		}
		if rolling > maxRolling {
			maxRolling = rolling
		}
		if settled == len(ds.Items) && len(ds.Items) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("shards did not all roll within 3 minutes (rolled: %v)", rolled)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("rollout order: %v", rolled)
	if maxRolling > 1 {
		t.Errorf("%d shards were rolling at the same time; want one at a time", maxRolling)
	}
	if len(overlaps) > 0 {
		t.Errorf("sources with connections from two processes at once: %v", overlaps[:min(len(overlaps), 5)])
	}
	n := pgbenchDone(2*time.Minute, "during the rollout")
	t.Logf("pgbench during the rollout: %s transactions, 0 failed", n)
}

func deploymentSettled(d *appsv1.Deployment) bool {
	s := d.Status
	return s.ObservedGeneration >= d.Generation && s.UpdatedReplicas == 1 && s.Replicas == 1 && s.AvailableReplicas == 1 && s.UnavailableReplicas == 0
}

// takenOver says why shard Deployment `name` has not fully taken over after
// its update ("" when it has): its Lease holder must be a pod of the
// Deployment's current template, and every source assigned to the shard
// must be served by that pod and Ready.
func takenOver(t *testing.T, name string) string {
	t.Helper()
	c := client(t)
	ctx := context.Background()
	d, err := c.AppsV1().Deployments(systemNS).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err.Error()
	}
	lease, err := c.CoordinationV1().Leases(systemNS).Get(ctx, name, metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
		return "no lease holder"
	}
	holder := *lease.Spec.HolderIdentity
	pod, err := c.CoreV1().Pods(systemNS).Get(ctx, holder, metav1.GetOptions{})
	if err != nil {
		return "holder pod " + holder + ": " + err.Error()
	}
	if pod.Annotations["shardpool.dev/template-hash"] != d.Annotations["shardpool.dev/template-hash"] {
		return "lease held by old pod " + holder
	}
	shard := d.Labels["shardpool.dev/shard"]
	out, _, err := kubectl(t, "", "get", "datasources", "-A", "-o", `jsonpath={range .items[*]}{.status.shard} {.status.servedBy} {.status.phase}{"\n"}{end}`)
	if err != nil {
		return err.Error()
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == shard && (f[1] != holder || f[2] != "Ready") {
			return "a source is " + f[2] + " on " + f[1]
		}
	}
	return ""
}

// backgroundPgbench starts pgbench through the router as user bi with
// `args`; the returned function waits (bounded) for it to end, fails the
// test unless it exited cleanly with zero failed transactions (`during`
// names the disruption), and returns the number of transactions.
func backgroundPgbench(t *testing.T, ip, pw string, args ...string) func(limit time.Duration, during string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	full := append([]string{"-h", ip, "-p", "5432", "-U", "bi"}, args...)
	cmd := exec.CommandContext(ctx, "pgbench", full...)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+pw)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	return func(limit time.Duration, during string) string {
		t.Helper()
		defer cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("pgbench: %v\n%s", err, out.String())
			}
		case <-time.After(limit):
			t.Fatal("pgbench did not finish")
		}
		res := out.String()
		if !strings.Contains(res, "number of failed transactions: 0 ") {
			t.Fatalf("transactions failed %s:\n%s", during, res)
		}
		m := regexp.MustCompile(`number of transactions actually processed: (\d+)`).FindStringSubmatch(res)
		if m == nil {
			t.Fatalf("no pgbench summary:\n%s", res)
		}
		return m[1]
	}
}
