package tests

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// canI asks the API server, as the release's ServiceAccount `sa`, whether
// it may `verb` the resource (resource[/name], "--subresource=x" as an
// extra argument) in namespace ns ("" for cluster scope).
func canI(t *testing.T, sa, ns, verb, resource string, extra ...string) bool {
	t.Helper()
	args := []string{"auth", "can-i", verb, resource, "--as=system:serviceaccount:" + systemNS + ":" + sa}
	if ns == "" {
		args = append(args, "--all-namespaces")
	} else {
		args = append(args, "-n", ns)
	}
	args = append(args, extra...)
	out, stderr, err := kubectl(t, "", args...)
	var exit *exec.ExitError
	switch {
	case err == nil && strings.TrimSpace(out) == "yes":
		return true
	case errors.As(err, &exit) && strings.TrimSpace(out) == "no":
		return false
	default:
		t.Fatalf("kubectl %v: %v (%q, %q)", args, err, out, stderr)
		return false
	}
}

// Each role holds exactly what it uses: every check below runs as the
// role's ServiceAccount against the installed release. The "must" rows
// show that the checks can answer yes (the role works); the "must not"
// rows are the privileges that were removed or never given.
func TestLeastPrivilegeRBAC(t *testing.T) {
	installed(t)
	type check struct {
		sa, ns, verb, resource string
		extra                  []string
		want                   bool
	}
	status := []string{"--subresource=status"}
	const (
		shard    = "shardpool-shard"
		operator = "shardpool-operator"
		router   = "shardpool-router"
	)
	checks := []check{
		// Shards: DataSources read and status written, Secrets only in the
		// tenant namespaces, their own Leases only, Events.
		{shard, "", "list", "datasources.shardpool.dev", nil, true},
		{shard, "", "watch", "datasources.shardpool.dev", nil, true},
		{shard, "tenants", "patch", "datasources.shardpool.dev", status, true},
		{shard, "tenants", "get", "secrets", nil, true},
		{shard, "tenants", "watch", "secrets", nil, true},
		{shard, "tenants", "create", "events.events.k8s.io", nil, true},
		{shard, systemNS, "update", "leases.coordination.k8s.io/shardpool-shard-0", nil, true},
		{shard, systemNS, "get", "leases.coordination.k8s.io/shardpool-shard-1", nil, true},
		{shard, systemNS, "create", "leases.coordination.k8s.io", nil, true},
		{shard, systemNS, "get", "secrets/shardpool-link-shard-0", nil, true},
		{shard, systemNS, "watch", "secrets/shardpool-link-shard-1", nil, true},
		{shard, systemNS, "get", "secrets/shardpool-link-ca", nil, false},
		{shard, systemNS, "get", "secrets/shardpool-link-router", nil, false},
		{shard, systemNS, "get", "secrets/shardpool-router-auth", nil, false},
		{shard, "", "get", "secrets", nil, false},
		{shard, "", "list", "secrets", nil, false},
		{shard, "kube-system", "get", "secrets", nil, false},
		{shard, "default", "list", "secrets", nil, false},
		{shard, systemNS, "get", "secrets", nil, false},
		{shard, systemNS, "update", "leases.coordination.k8s.io/shardpool-operator", nil, false},
		{shard, systemNS, "get", "leases.coordination.k8s.io/shardpool-operator", nil, false},
		{shard, systemNS, "update", "leases.coordination.k8s.io/unrelated", nil, false},
		{shard, systemNS, "patch", "leases.coordination.k8s.io/shardpool-shard-0", nil, false},
		{shard, systemNS, "delete", "leases.coordination.k8s.io/shardpool-shard-0", nil, false},
		{shard, "tenants", "get", "datasources.shardpool.dev", nil, false},
		{shard, "tenants", "update", "datasources.shardpool.dev", nil, false},
		{shard, "tenants", "patch", "datasources.shardpool.dev", nil, false},
		{shard, "tenants", "delete", "datasources.shardpool.dev", nil, false},
		{shard, "tenants", "get", "datasources.shardpool.dev", status, false},
		{shard, "tenants", "update", "datasources.shardpool.dev", status, false},
		{shard, "tenants", "create", "events", nil, false},
		{shard, "tenants", "delete", "events.events.k8s.io", nil, false},
		{shard, systemNS, "get", "pods", nil, false},
		{shard, systemNS, "list", "configmaps", nil, false},
		{shard, systemNS, "patch", "deployments.apps", nil, false},
		{shard, "kube-system", "update", "leases.coordination.k8s.io/shardpool-shard-0", nil, false},
		// The operator: shard Deployments, its own Lease, status of
		// DataSources; no Secrets, Services, budgets or shard Leases.
		{operator, "", "list", "datasources.shardpool.dev", nil, true},
		{operator, "tenants", "patch", "datasources.shardpool.dev", status, true},
		{operator, systemNS, "create", "deployments.apps", nil, true},
		{operator, systemNS, "patch", "deployments.apps", nil, true},
		{operator, systemNS, "delete", "deployments.apps", nil, true},
		{operator, systemNS, "update", "leases.coordination.k8s.io/shardpool-operator", nil, true},
		{operator, systemNS, "list", "leases.coordination.k8s.io", nil, true},
		{operator, systemNS, "get", "pods", nil, true},
		{operator, systemNS, "get", "replicasets.apps", nil, true},
		{operator, systemNS, "watch", "configmaps", nil, true},
		{operator, systemNS, "update", "leases.coordination.k8s.io/shardpool-shard-0", nil, false},
		{operator, systemNS, "patch", "leases.coordination.k8s.io/shardpool-operator", nil, false},
		{operator, systemNS, "delete", "leases.coordination.k8s.io/shardpool-shard-0", nil, false},
		{operator, systemNS, "update", "deployments.apps", nil, false},
		{operator, "kube-system", "create", "deployments.apps", nil, false},
		{operator, "tenants", "delete", "datasources.shardpool.dev", nil, false},
		{operator, systemNS, "create", "services", nil, false},
		{operator, systemNS, "update", "services", nil, false},
		{operator, systemNS, "delete", "services", nil, false},
		{operator, systemNS, "create", "poddisruptionbudgets.policy", nil, false},
		{operator, systemNS, "update", "poddisruptionbudgets.policy", nil, false},
		{operator, systemNS, "delete", "poddisruptionbudgets.policy", nil, false},
		{operator, systemNS, "get", "configmaps", nil, false},
		{operator, systemNS, "update", "configmaps", nil, false},
		{operator, systemNS, "delete", "pods", nil, false},
		{operator, systemNS, "get", "secrets/shardpool-link-ca", nil, true},
		{operator, systemNS, "update", "secrets/shardpool-link-shard-0", nil, true},
		{operator, systemNS, "create", "secrets", nil, true},
		{operator, systemNS, "get", "secrets/shardpool-router-auth", nil, false},
		{operator, systemNS, "update", "secrets/shardpool-router-tls", nil, false},
		{operator, systemNS, "delete", "secrets/shardpool-link-ca", nil, false},
		{operator, "", "get", "secrets", nil, false},
		{operator, systemNS, "get", "secrets", nil, false},
		{operator, "tenants", "get", "secrets", nil, false},
		{operator, "tenants", "get", "datasources.shardpool.dev", nil, false},
		{operator, "tenants", "get", "datasources.shardpool.dev", status, false},
		{operator, "tenants", "update", "datasources.shardpool.dev", nil, false},
		{operator, "tenants", "create", "events", nil, false},
		// Routers: read-only caches of DataSources, shard Leases and pods,
		// and their own auth Secret by name.
		{router, "", "list", "datasources.shardpool.dev", nil, true},
		{router, systemNS, "watch", "leases.coordination.k8s.io", nil, true},
		{router, systemNS, "list", "pods", nil, true},
		{router, systemNS, "get", "secrets/shardpool-router-auth", nil, true},
		{router, systemNS, "watch", "secrets/shardpool-router-auth", nil, true},
		{router, systemNS, "get", "secrets/shardpool-router-tls", nil, false},
		{router, systemNS, "get", "secrets/shardpool-link-router", nil, true},
		{router, systemNS, "get", "secrets/shardpool-link-ca", nil, false},
		{router, systemNS, "get", "secrets/shardpool-link-shard-0", nil, false},
		{router, systemNS, "list", "secrets", nil, false},
		{router, "", "get", "secrets", nil, false},
		{router, systemNS, "get", "secrets", nil, false},
		{router, "tenants", "get", "datasources.shardpool.dev", nil, false},
		{router, "tenants", "patch", "datasources.shardpool.dev", status, false},
		{router, systemNS, "get", "leases.coordination.k8s.io", nil, false},
		{router, systemNS, "update", "leases.coordination.k8s.io/shardpool-shard-0", nil, false},
		{router, systemNS, "get", "pods", nil, false},
		{router, systemNS, "create", "pods", nil, false},
		{router, "tenants", "create", "events.events.k8s.io", nil, false},
	}
	for _, c := range checks {
		got := canI(t, c.sa, c.ns, c.verb, c.resource, c.extra...)
		if got != c.want {
			t.Errorf("%s may %s %s %v in %q: got %v, want %v", c.sa, c.verb, c.resource, c.extra, c.ns, got, c.want)
		}
	}
	t.Logf("%d RBAC checks (as each ServiceAccount)", len(checks))
}

// A DataSource in a namespace that was never onboarded (no RoleBinding
// for the shards there) is not served, and its status says why and what to
// do, without the shards reading anything there.
func TestSecretsOutsideTenantNamespacesAreRefused(t *testing.T) {
	installed(t)
	c := client(t)
	ctx := context.Background()
	ns, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "not-onboarded-"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{}) })
	if canI(t, "shardpool-shard", ns.Name, "get", "secrets") {
		t.Fatalf("the shards may read Secrets in %s without a RoleBinding", ns.Name)
	}
	if _, stderr, err := kubectl(t, warehouseSources(ns.Name, "src-%d", 1, 1, 2), "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	var last string
	eventually(t, 60*time.Second, "the source reports that its Secret may not be read", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", ns.Name, "get", "datasources.shardpool.dev", "src-0", "-o", "jsonpath={.status.phase}|{.status.lastError}")
		last = out
		return strings.HasPrefix(out, "Error|") && strings.Contains(out, "tenantNamespaces"), err
	})
	t.Logf("not onboarded: %s", last)

	// Onboarding the namespace (the RoleBinding) lets it in, no restart.
	grantTenantNamespace(t, c, ns.Name)
	eventually(t, 90*time.Second, "the source Ready once the namespace is onboarded", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", ns.Name, "get", "datasources.shardpool.dev", "src-0", "-o", "jsonpath={.status.phase}")
		return out == "Ready", err
	})
}
