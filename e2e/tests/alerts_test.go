package tests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// promcheck builds e2e/promcheck (Prometheus's rule parser and PromQL
// parser, a module of its own) into e2e/.bin and returns its path.
func promcheck(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(repoRoot(), "e2e", ".bin", "promcheck")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = filepath.Join(repoRoot(), "e2e", "promcheck")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building promcheck: %v\n%s", err, out)
	}
	return bin
}

// renderedRules is the PrometheusRule's groups as the chart renders them
// with metrics.prometheusRule.enabled, as a rules file.
func renderedRules(t *testing.T) []byte {
	t.Helper()
	out, err := exec.Command(filepath.Join(repoRoot(), "e2e", ".bin", "helm"), "template", "shardpool",
		filepath.Join(repoRoot(), "charts", "shardpool"), "--namespace", systemNS,
		"--kube-version", "1.33.0", "--set", "metrics.prometheusRule.enabled=true", "--show-only", "templates/monitoring.yaml").CombinedOutput()
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, out)
	}
	for _, doc := range strings.Split(string(out), "\n---") {
		var obj struct {
			Kind string `json:"kind"`
			Spec struct {
				Groups []any `json:"groups"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil || obj.Kind != "PrometheusRule" {
			continue
		}
		b, err := yaml.Marshal(map[string]any{"groups": obj.Spec.Groups})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	t.Fatalf("no PrometheusRule rendered:\n%s", out)
	return nil
}

// The chart's alerts are valid Prometheus rules (checked by Prometheus's
// own parser, as promtool does), cover what the platform team needs, name
// only metrics the running pods export, and each links a runbook section
// that docs/operations.md has.
func TestAlertRules(t *testing.T) {
	installed(t)
	bin := promcheck(t)
	dir := t.TempDir()

	// The checker refuses a broken rule (so its passing below means something).
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("groups:\n- name: x\n  rules:\n  - alert: Broken\n    expr: sum(rate(x[5m]) > \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, bad).CombinedOutput(); err == nil {
		t.Fatalf("promcheck accepted an invalid expression:\n%s", out)
	}

	rules := filepath.Join(dir, "rules.yaml")
	rendered := renderedRules(t)
	if err := os.WriteFile(rules, rendered, 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(bin, rules)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the chart's rules are invalid: %v\n%s", err, stderr.String())
	}
	metrics := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		alert, metric, ok := strings.Cut(line, "\t")
		if ok {
			metrics[alert] = append(metrics[alert], metric)
		}
	}
	for _, want := range []string{
		"ShardpoolSourceNotReady", "ShardpoolSourcesNotServed", "ShardpoolShardWithoutLeaseHolder",
		"ShardpoolLeaseHolderChurn", "ShardpoolPoolSaturated", "ShardpoolCheckoutWaitHigh",
		"ShardpoolConnectFailures", "ShardpoolOperatorNoLeader", "ShardpoolReconcileErrors",
		"ShardpoolAdmissionRefused", "ShardpoolRuntimeLag",
	} {
		if len(metrics[want]) == 0 {
			t.Errorf("no alert %s (or it selects no metric)", want)
		}
	}

	// Every metric the rules select is exported by a running pod: it has
	// samples, or (series that exist only once something happened, such as
	// admission refusals) its family is declared by a # TYPE line.
	var exported []string
	for _, component := range []string{"operator", "shard", "router"} {
		for pod, ip := range podIPs(t, component) {
			lines, err := metricLines(ip, "shardpool_")
			if err != nil {
				t.Fatalf("metrics of %s: %v", pod, err)
			}
			exported = append(exported, lines...)
			for _, m := range typeLine.FindAllStringSubmatch(rawMetrics(t, ip), -1) {
				switch m[2] {
				case "counter":
					exported = append(exported, m[1]+"_total ")
				case "histogram":
					exported = append(exported, m[1]+"_bucket ", m[1]+"_sum ", m[1]+"_count ")
				default:
					exported = append(exported, m[1]+" ")
				}
			}
		}
	}
	has := func(name string) bool {
		for _, l := range exported {
			if strings.HasPrefix(l, name+"{") || strings.HasPrefix(l, name+" ") {
				return true
			}
		}
		return false
	}
	for alert, names := range metrics {
		for _, m := range names {
			if !has(m) {
				t.Errorf("alert %s selects %s, which no shardpool pod exports", alert, m)
			}
		}
	}

	// Every runbook link points at a section of docs/operations.md.
	doc, err := os.ReadFile(filepath.Join(repoRoot(), "docs", "operations.md"))
	if err != nil {
		t.Fatal(err)
	}
	anchors := map[string]bool{}
	for _, h := range regexp.MustCompile(`(?m)^#+ +(.+)$`).FindAllStringSubmatch(string(doc), -1) {
		a := strings.ToLower(strings.TrimSpace(h[1]))
		a = regexp.MustCompile(`[^a-z0-9 -]`).ReplaceAllString(a, "")
		anchors[strings.ReplaceAll(a, " ", "-")] = true
	}
	links := regexp.MustCompile(`runbook_url: "?[^"#\n]*#([a-z0-9-]+)`).FindAllStringSubmatch(string(rendered), -1)
	if len(links) < len(metrics) {
		t.Errorf("%d runbook links for %d alerts", len(links), len(metrics))
	}
	for _, l := range links {
		if !anchors[l[1]] {
			t.Errorf("runbook anchor #%s is not a heading of docs/operations.md", l[1])
		}
	}
}
