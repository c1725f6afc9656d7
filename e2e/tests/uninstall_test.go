package tests

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// `helm uninstall` leaves no shardpool process or object behind except the
// CRD and the user's DataSources: the shard Deployments and every Lease are
// owned by the operator's Deployment and go through garbage collection.
// It removes the install, so run-tests.sh runs it last, on its own
// (SHARDPOOL_E2E_UNINSTALL=1), and reinstalls when it keeps the cluster.
func TestHelmUninstallLeavesNothing(t *testing.T) {
	if os.Getenv("SHARDPOOL_E2E_UNINSTALL") != "1" {
		t.Skip("destructive: run-tests.sh runs it last with SHARDPOOL_E2E_UNINSTALL=1")
	}
	installed(t)
	c := client(t)
	ctx := context.Background()
	pods, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=shardpool"})
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, p := range pods.Items {
		if pid := containerPid(&p); pid > 0 {
			pids = append(pids, pid)
		}
	}
	if len(pids) < 4 {
		t.Fatalf("expected operator, router and shard processes, found %d", len(pids))
	}
	leases, err := c.CoordinationV1().Leases(systemNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leases.Items {
		if len(l.OwnerReferences) == 0 {
			t.Errorf("Lease %s has no owner reference; uninstall would leave it", l.Name)
		}
	}
	before, _, _ := kubectl(t, "", "get", "datasources", "-A", "-o", "name")

	helm := filepath.Join(repoRoot(), "e2e", ".bin", "helm")
	hctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	started := time.Now()
	if out, err := exec.CommandContext(hctx, helm, "--kubeconfig", os.Getenv("KUBECONFIG"), "uninstall", "shardpool", "-n", systemNS, "--wait", "--timeout", "120s").CombinedOutput(); err != nil {
		t.Fatalf("helm uninstall: %v\n%s", err, out)
	}
	kinds := "deployments,replicasets,pods,services,serviceaccounts,configmaps,roles,rolebindings,poddisruptionbudgets,leases.coordination.k8s.io,horizontalpodautoscalers"
	eventually(t, 120*time.Second, "no shardpool object or process left", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", systemNS, "get", kinds, "-o", "name")
		if err != nil {
			return false, err
		}
		var left []string
		for _, n := range strings.Fields(out) {
			// The namespace's own objects. (Secrets are not listed: the
			// router credentials are the platform team's, not the chart's.)
			if strings.HasSuffix(n, "/kube-root-ca.crt") || strings.HasSuffix(n, "/default") {
				continue
			}
			left = append(left, n)
		}
		cluster, _, err := kubectl(t, "", "get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/name=shardpool", "-o", "name")
		if err != nil {
			return false, err
		}
		left = append(left, strings.Fields(cluster)...)
		// The link PKI the operator made (owned by its Deployment: GC), and
		// the shards' RoleBindings in the tenant namespaces.
		pki, _, err := kubectl(t, "", "-n", systemNS, "get", "secrets", "-l", "app.kubernetes.io/component=link-pki", "-o", "name")
		if err != nil {
			return false, err
		}
		left = append(left, strings.Fields(pki)...)
		tenantRB, _, err := kubectl(t, "", "-n", "tenants", "get", "rolebindings", "-l", "app.kubernetes.io/name=shardpool", "-o", "name")
		if err != nil {
			return false, err
		}
		left = append(left, strings.Fields(tenantRB)...)
		for _, pid := range pids {
			if processAlive(pid) {
				left = append(left, fmt.Sprintf("process %d", pid))
			}
		}
		if len(left) > 0 {
			return false, fmt.Errorf("left: %v", left)
		}
		return true, nil
	})
	t.Logf("uninstall: nothing left after %.1fs", time.Since(started).Seconds())
	if _, _, err := kubectl(t, "", "get", "crd", "datasources.shardpool.dev"); err != nil {
		t.Errorf("the CRD must stay (Helm keeps crds/): %v", err)
	}
	after, _, _ := kubectl(t, "", "get", "datasources", "-A", "-o", "name")
	if after != before {
		t.Errorf("DataSources changed: before\n%s\nafter\n%s", before, after)
	}
}
