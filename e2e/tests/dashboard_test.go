package tests

import (
	"context"
	"encoding/json"
	"regexp"
	"sort"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var metricRef = regexp.MustCompile(`\bshardpool_[a-z_]+`)
var typeLine = regexp.MustCompile(`(?m)^# TYPE (shardpool_[a-z_]+) (counter|gauge|histogram)$`)

// exprs collects every "expr" string in a Grafana dashboard.
func exprs(v any, out *[]string) {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if s, ok := e.(string); ok && k == "expr" {
				*out = append(*out, s)
			} else {
				exprs(e, out)
			}
		}
	case []any:
		for _, e := range x {
			exprs(e, out)
		}
	}
}

// The installed dashboard ConfigMap holds valid Grafana JSON whose every
// query names a metric that a running pod of the release exports (so a
// renamed metric cannot silently empty a panel).
func TestDashboardQueriesExportedMetrics(t *testing.T) {
	ip, pw := installed(t)
	// Traffic, so that per-source series exist: a query, an error.
	if _, stderr, err := psqlRouter(t, ip, pw, "tenants.acme", "-c", "SELECT 1"); err != nil {
		t.Fatalf("query: %v\n%s", err, stderr)
	}
	if _, _, err := psqlRouter(t, ip, pw, "tenants.acme", "-c", "SELECT 1/0"); err == nil {
		t.Fatal("SELECT 1/0 succeeded")
	}
	cm, err := client(t).CoreV1().ConfigMaps(systemNS).Get(context.Background(), "shardpool-dashboard", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("dashboard ConfigMap: %v", err)
	}
	if cm.Labels["grafana_dashboard"] != "1" {
		t.Errorf("dashboard ConfigMap lacks the grafana_dashboard label: %v", cm.Labels)
	}
	var dash map[string]any
	if err := json.Unmarshal([]byte(cm.Data["shardpool.json"]), &dash); err != nil {
		t.Fatalf("dashboard is not JSON: %v", err)
	}
	var qs []string
	exprs(dash, &qs)
	if len(qs) < 15 {
		t.Fatalf("dashboard has %d queries, expected the key panels", len(qs))
	}
	// Metric families the pods export, from their # TYPE lines.
	exported := map[string]string{}
	for _, role := range []string{"router", "shard", "operator"} {
		ips := podIPs(t, role)
		if len(ips) == 0 {
			t.Fatalf("no Ready %s pod", role)
		}
		for _, ip := range ips {
			body := rawMetrics(t, ip)
			for _, m := range typeLine.FindAllStringSubmatch(body, -1) {
				exported[m[1]] = m[2]
			}
		}
	}
	var missing []string
	for _, q := range qs {
		for _, ref := range metricRef.FindAllString(q, -1) {
			base := ref
			for _, suffix := range []string{"_total", "_bucket", "_sum", "_count"} {
				if strings.HasSuffix(ref, suffix) {
					if kind, ok := exported[strings.TrimSuffix(ref, suffix)]; ok && (suffix == "_total") == (kind == "counter") {
						base = strings.TrimSuffix(ref, suffix)
					}
				}
			}
			if _, ok := exported[base]; !ok {
				missing = append(missing, ref)
			}
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("dashboard queries metrics no pod exports: %v", missing)
	}
}
