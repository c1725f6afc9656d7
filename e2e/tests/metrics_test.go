package tests

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// sample is one series of a /metrics page.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

var seriesLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? ([0-9.eE+-]+|NaN|[+-]Inf)$`)
var labelPair = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

// rawMetrics is the text of http://ip:9090/metrics, checked to be
// OpenMetrics (content type, final # EOF).
func rawMetrics(t *testing.T, ip string) string {
	t.Helper()
	hc := http.Client{Timeout: 10 * time.Second}
	resp, err := hc.Get("http://" + ip + ":9090/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", ip, err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/openmetrics-text") {
		t.Errorf("%s/metrics Content-Type %q", ip, ct)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	text := string(body)
	if !strings.HasSuffix(text, "# EOF\n") {
		t.Errorf("%s/metrics does not end with # EOF", ip)
	}
	return text
}

// scrape reads http://ip:9090/metrics into samples.
func scrape(t *testing.T, ip string) []sample {
	t.Helper()
	text := rawMetrics(t, ip)
	var out []sample
	for _, line := range strings.Split(text, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		m := seriesLine.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("unparsable metrics line %q", line)
			continue
		}
		v, err := strconv.ParseFloat(m[4], 64)
		if err != nil {
			t.Errorf("bad value in %q", line)
			continue
		}
		s := sample{name: m[1], labels: map[string]string{}, value: v}
		for _, p := range labelPair.FindAllStringSubmatch(m[3], -1) {
			s.labels[p[1]] = p[2]
		}
		out = append(out, s)
	}
	return out
}

// value sums the series named `name` whose labels include `want`; found
// says whether any matched.
func value(samples []sample, name string, want map[string]string) (sum float64, found bool) {
	for _, s := range samples {
		if s.name != name {
			continue
		}
		ok := true
		for k, v := range want {
			if s.labels[k] != v {
				ok = false
			}
		}
		if ok {
			sum += s.value
			found = true
		}
	}
	return sum, found
}

func podIPs(t *testing.T, component string) map[string]string {
	t.Helper()
	pods, err := client(t).CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + component})
	if err != nil {
		t.Fatal(err)
	}
	ips := map[string]string{}
	for _, p := range pods.Items {
		if _, ok := podReadySince(&p); ok && p.DeletionTimestamp == nil {
			ips[p.Name] = p.Status.PodIP
		}
	}
	return ips
}

// Every role serves Prometheus metrics, and they agree with what happened:
// the router counts the queries and errors it answered, the shard's pool
// gauges match pg_stat_activity on the warehouse, the operator's spread
// covers every source and exactly one operator replica leads.
func TestMetricsTellWhatHappened(t *testing.T) {
	ip, pw := installed(t)
	src := map[string]string{"frontend": "pg", "namespace": "tenants", "source": "acme"}
	before := scrape(t, ip)
	q0, _ := value(before, "shardpool_router_queries_total", src)
	e0, _ := value(before, "shardpool_router_errors_total", map[string]string{"frontend": "pg", "namespace": "tenants", "source": "acme", "class": "22"})
	for i := 0; i < 5; i++ {
		if _, stderr, err := psqlRouter(t, ip, pw, "tenants.acme", "-c", "SELECT 1"); err != nil {
			t.Fatalf("query: %v\n%s", err, stderr)
		}
	}
	if _, stderr, err := psqlRouter(t, ip, pw, "tenants.acme", "-c", "SELECT 1/0"); err == nil || !strings.Contains(stderr, "division by zero") {
		t.Fatalf("SELECT 1/0 should fail with division by zero: %v\n%s", err, stderr)
	}
	after := scrape(t, ip)
	q1, _ := value(after, "shardpool_router_queries_total", src)
	e1, _ := value(after, "shardpool_router_errors_total", map[string]string{"frontend": "pg", "namespace": "tenants", "source": "acme", "class": "22"})
	if q1-q0 != 6 {
		t.Errorf("router counted %v queries for tenants/acme, want 6", q1-q0)
	}
	if e1-e0 != 1 {
		t.Errorf("router counted %v class-22 errors for tenants/acme, want 1", e1-e0)
	}
	if n, ok := value(after, "shardpool_router_query_duration_seconds_count", map[string]string{"frontend": "pg"}); !ok || n < 6 {
		t.Errorf("router latency histogram has %v observations, want at least 6", n)
	}
	// A name that is no DataSource is counted, but under empty labels:
	// clients cannot create series by inventing names.
	bogus := fmt.Sprintf("nope-%d", time.Now().UnixNano())
	if _, _, err := psqlRouter(t, ip, pw, "tenants."+bogus, "-c", "SELECT 1"); err == nil {
		t.Fatalf("tenants.%s should not exist", bogus)
	}
	unknown := map[string]string{"frontend": "pg", "namespace": "", "source": "", "class": "3D"}
	u0, _ := value(after, "shardpool_router_errors_total", unknown)
	after = scrape(t, ip)
	if u1, _ := value(after, "shardpool_router_errors_total", unknown); u1-u0 != 1 {
		t.Errorf("unknown source errors went from %v to %v, want one more", u0, u1)
	}
	for _, s := range after {
		if s.labels["source"] == bogus {
			t.Errorf("a series is labelled with the unknown source %s: %s", bogus, s.name)
		}
	}
	if n, _ := value(after, "shardpool_router_clients", map[string]string{"frontend": "pg"}); n != 0 {
		t.Errorf("router reports %v open pg clients after every psql exited", n)
	}

	// The shard serving acme: its pool gauges equal the warehouse's view.
	shard, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "acme", "-o", "jsonpath={.status.servedBy}")
	if err != nil || shard == "" {
		t.Fatalf("acme has no servedBy: %v", err)
	}
	k, _, _ := kubectl(t, "", "-n", "tenants", "get", "datasource", "acme", "-o", "jsonpath={.status.shard}")
	shardIP := podIPs(t, "shard")[shard]
	if shardIP == "" {
		t.Fatalf("no Ready pod %s", shard)
	}
	sm := scrape(t, shardIP)
	acme := map[string]string{"namespace": "tenants", "source": "acme"}
	eventually(t, 20*time.Second, "shard pool gauges match pg_stat_activity", func() (bool, error) {
		sm = scrape(t, shardIP)
		open, found := value(sm, "shardpool_pool_connections", acme)
		if !found {
			return false, fmt.Errorf("no shardpool_pool_connections for tenants/acme")
		}
		seen, _ := strconv.ParseFloat(warehouse(t, "postgres", fmt.Sprintf("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'shardpool/tenants/acme/%s/%%'", k)), 64)
		if open != seen {
			return false, fmt.Errorf("metrics say %v connections, pg_stat_activity %v", open, seen)
		}
		return true, nil
	})
	if n, _ := value(sm, "shardpool_pool_transactions_total", acme); n < 6 {
		t.Errorf("shard counted %v transactions for tenants/acme, want at least 6", n)
	}
	if n, _ := value(sm, "shardpool_shard_lease_held", nil); n != 1 {
		t.Errorf("serving shard reports lease_held %v", n)
	}
	if n, _ := value(sm, "shardpool_pool_connects_total", map[string]string{"namespace": "tenants", "source": "acme", "result": "ok"}); n < 1 {
		t.Errorf("shard counted %v successful connects for tenants/acme", n)
	}

	// The operator: one leader; its spread covers every assigned source.
	leaders := 0
	for name, oip := range podIPs(t, "operator") {
		om := scrape(t, oip)
		if l, _ := value(om, "shardpool_operator_leader", nil); l != 1 {
			continue
		}
		leaders++
		out, _, err := kubectl(t, "", "get", "datasources", "-A", "-o", "jsonpath={range .items[*]}{.status.shard}{\"\\n\"}{end}")
		if err != nil {
			t.Fatal(err)
		}
		assigned := 0
		for _, l := range strings.Split(out, "\n") {
			if strings.TrimSpace(l) != "" {
				assigned++
			}
		}
		if n, _ := value(om, "shardpool_operator_shard_sources", nil); int(n) != assigned {
			t.Errorf("operator %s reports %v sources over its shards, %d are assigned", name, n, assigned)
		}
		if n, _ := value(om, "shardpool_operator_reconciles_total", map[string]string{"result": "ok"}); n < 1 {
			t.Errorf("operator %s counted no successful reconcile", name)
		}
	}
	if leaders != 1 {
		t.Errorf("%d operator replicas report leading, want 1", leaders)
	}
}

// The chart's workerThreads reach the processes: routers and shards run
// their tasks on the number of threads the values ask for (1 by default),
// as each reports in shardpool_runtime_workers.
func TestRuntimeThreadsFollowTheChart(t *testing.T) {
	installed(t)
	for _, component := range []string{"router", "shard", "operator"} {
		ips := podIPs(t, component)
		if len(ips) == 0 {
			t.Fatalf("no ready %s pod", component)
		}
		for name, ip := range ips {
			n, found := value(scrape(t, ip), "shardpool_runtime_workers", nil)
			if !found || n != 1 {
				t.Errorf("%s %s runs on %v threads (exported: %v), want 1", component, name, n, found)
			}
		}
	}
}
