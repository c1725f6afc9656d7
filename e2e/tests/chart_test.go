package tests

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The chart renders into objects the API server accepts (server-side dry
// run, CRD included), and values.schema.json rejects a wrong value.
func TestChartRendersAndTheServerAcceptsIt(t *testing.T) {
	restConfig(t)
	helm := filepath.Join(repoRoot(), "e2e", ".bin", "helm")
	chart := filepath.Join(repoRoot(), "charts", "shardpool")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, helm, "template", "dryrun", chart, "--namespace", systemNS, "--include-crds", "--kube-version", "1.33.0").Output()
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	stdout, stderr, err := kubectl(t, string(out), "apply", "--dry-run=server", "-n", systemNS, "-f", "-")
	if err != nil {
		t.Fatalf("server rejected the rendered chart: %v\n%s", err, stderr)
	}
	for _, kind := range []string{"deployment.apps/dryrun-shardpool-operator", "deployment.apps/dryrun-shardpool-router", "clusterrole.rbac.authorization.k8s.io/dryrun-shardpool-shard", "configmap/dryrun-shardpool-shard-template",
		"poddisruptionbudget.policy/dryrun-shardpool-router", "poddisruptionbudget.policy/dryrun-shardpool-shards", "service/dryrun-shardpool-metrics", "configmap/dryrun-shardpool-dashboard"} {
		if !strings.Contains(stdout, kind) {
			t.Errorf("dry run lacks %s:\n%s", kind, stdout)
		}
	}
	// Optional pieces: the HPA (server-validated), the ServiceMonitor (its
	// CRD is prometheus-operator's, not installed here: rendered only).
	out, err = exec.CommandContext(ctx, helm, "template", "dryrun", chart, "--namespace", systemNS, "--kube-version", "1.33.0",
		"--set", "router.autoscaling.enabled=true", "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=prom").Output()
	if err != nil {
		t.Fatalf("helm template with autoscaling and ServiceMonitor: %v", err)
	}
	docs := strings.Split(string(out), "\n---\n")
	var rest []string
	sawMonitor := false
	for _, d := range docs {
		if strings.Contains(d, "kind: ServiceMonitor") {
			sawMonitor = true
			for _, want := range []string{"release: prom", "port: metrics", "app.kubernetes.io/component: metrics"} {
				if !strings.Contains(d, want) {
					t.Errorf("ServiceMonitor lacks %q:\n%s", want, d)
				}
			}
			continue
		}
		if strings.Contains(d, "kind: Deployment") && strings.Contains(d, "name: dryrun-shardpool-router") && strings.Contains(d, "replicas:") {
			t.Errorf("with autoscaling the router Deployment must leave replicas to the HPA:\n%s", d)
		}
		rest = append(rest, d)
	}
	if !sawMonitor {
		t.Errorf("metrics.serviceMonitor.enabled=true rendered no ServiceMonitor")
	}
	stdout, stderr, err = kubectl(t, strings.Join(rest, "\n---\n"), "apply", "--dry-run=server", "-n", systemNS, "-f", "-")
	if err != nil || !strings.Contains(stdout, "horizontalpodautoscaler.autoscaling/dryrun-shardpool-router") {
		t.Errorf("server rejected the HPA rendering or it has no HPA: %v\n%s\n%s", err, stdout, stderr)
	}
	bad, err := exec.CommandContext(ctx, helm, "template", "dryrun", chart, "--kube-version", "1.33.0", "--set", "shard.count=0").CombinedOutput()
	if err == nil || !strings.Contains(string(bad), "/shard/count") {
		t.Errorf("shard.count=0 was not rejected by values.schema.json: %v\n%s", err, bad)
	}
}
