package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// applyCRD installs crds/ (generated from src/crd.rs) and waits until the
// API server serves the DataSource type.
func applyCRD(t *testing.T) {
	t.Helper()
	restConfig(t) // fails clearly without a cluster
	crd := filepath.Join(repoRoot(), "crds", "datasource.yaml")
	if _, stderr, err := kubectl(t, "", "apply", "--server-side", "--force-conflicts", "-f", crd); err != nil {
		t.Fatalf("apply %s: %v\n%s", crd, err, stderr)
	}
	if _, stderr, err := kubectl(t, "", "wait", "--for=condition=Established", "crd/datasources.shardpool.dev", "--timeout=60s"); err != nil {
		t.Fatalf("CRD not established: %v\n%s", err, stderr)
	}
}

func dataSource(ns, name, spec string) string {
	return fmt.Sprintf("apiVersion: shardpool.dev/v1alpha1\nkind: DataSource\nmetadata:\n  name: %s\n  namespace: %s\nspec:\n%s", name, ns, spec)
}

const goodSpec = `  host: warehouse.example.com
  port: 5432
  database: sales
  user: bi_reader
  passwordSecretRef: {name: sales-db, key: password}
  tls: {mode: prefer}
  pool: {minIdle: 2, maxSize: 12, connectTimeout: 5s, acquireTimeout: 2s, idleTimeout: 10m, maxLifetime: 1h, statementTimeout: 30s}
`

// withField replaces (or, with an empty value, removes) one line of goodSpec
// that starts with the given key.
func withField(key, line string) string {
	var out []string
	for _, l := range strings.Split(strings.TrimRight(goodSpec, "\n"), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), key+":") {
			if line != "" {
				out = append(out, "  "+line)
			}
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n") + "\n"
}

func withPool(pool string) string { return withField("pool", "pool: "+pool) }

// Every bad DataSource is rejected by the API server at admission, with a
// message that names the offending field.
func TestDataSourceSchemaRejectsBadResources(t *testing.T) {
	c := client(t)
	applyCRD(t)
	ns := tempNamespace(t, c, "schema")
	okPool := "minIdle: 1, maxSize: 4"
	cases := []struct {
		name, spec string
		want       []string
	}{
		{"missing-host", withField("host", ""), []string{"spec.host", "Required"}},
		{"port-zero", withField("port", "port: 0"), []string{"spec.port", "greater than or equal to 1"}},
		{"port-too-big", withField("port", "port: 70000"), []string{"spec.port", "less than or equal to 65535"}},
		{"port-not-a-number", withField("port", `port: "5432"`), []string{"spec.port", "integer"}},
		{"min-idle-above-max-size", withPool("{minIdle: 20, maxSize: 10}"), []string{"spec.pool.minIdle", "minIdle must not exceed maxSize"}},
		{"max-size-zero", withPool("{minIdle: 0, maxSize: 0}"), []string{"spec.pool.maxSize", "greater than or equal to 1"}},
		{"max-size-too-big", withPool("{minIdle: 1, maxSize: 5000}"), []string{"spec.pool.maxSize", "less than or equal to 1000"}},
		{"min-idle-negative", withPool("{minIdle: -1, maxSize: 4}"), []string{"spec.pool.minIdle", "greater than or equal to 0"}},
		{"duration-words", withPool("{" + okPool + ", connectTimeout: 10 seconds}"), []string{"spec.pool.connectTimeout", "should match"}},
		{"duration-days", withPool("{" + okPool + ", maxLifetime: 1d}"), []string{"spec.pool.maxLifetime", "should match"}},
		{"unknown-tls-mode", withField("tls", "tls: {mode: verify-ca}"), []string{"spec.tls.mode", "Unsupported value", "verify-full"}},
		{"verify-full-without-ca", withField("tls", "tls: {mode: verify-full}"), []string{"spec.tls.caSecretRef", "verify-full needs caSecretRef"}},
		{"legacy-auth-without-tls", withField("tls", "tls: {mode: disable}") + "  allowLegacyPasswordAuth: true\n", []string{"spec.allowLegacyPasswordAuth", "needs TLS"}},
		{"legacy-auth-not-bool", goodSpec + "  allowLegacyPasswordAuth: sometimes\n", []string{"spec.allowLegacyPasswordAuth", "boolean"}},
		{"empty-secret-key", withField("passwordSecretRef", "passwordSecretRef: {name: sales-db, key: \"\"}"), []string{"spec.passwordSecretRef.key", "at least 1"}},
		{"secret-name-uppercase", withField("passwordSecretRef", "passwordSecretRef: {name: Sales_DB, key: password}"), []string{"spec.passwordSecretRef.name", "should match"}},
		{"missing-password-secret-ref", withField("passwordSecretRef", ""), []string{"spec.passwordSecretRef", "Required"}},
		{"unknown-field", goodSpec + "  hostname: other.example.com\n", []string{"unknown field", "spec.hostname"}},
		{"database-64-chars", withField("database", "database: "+strings.Repeat("d", 64)), []string{"spec.database", "Too long", "63"}},
		{"database-64-bytes", withField("database", "database: "+strings.Repeat("é", 32)), []string{"spec.database", "63 bytes"}},
		{"empty-user", withField("user", `user: ""`), []string{"spec.user", "at least 1"}},
		{"host-with-space", withField("host", "host: db host"), []string{"spec.host", "should match"}},
		{"paused-not-bool", goodSpec + "  paused: \"yes\"\n", []string{"spec.paused", "boolean"}},
		{"max-queued-negative", goodSpec + "  limits: {maxQueued: -1}\n", []string{"spec.limits.maxQueued", "greater than or equal to 0"}},
		{"unknown-fairness", goodSpec + "  limits: {fairness: Random}\n", []string{"spec.limits.fairness", "Unsupported value", "Arrival"}},
		{"notice-after-words", goodSpec + "  limits: {noticeAfter: 2 seconds}\n", []string{"spec.limits.noticeAfter", "should match"}},
		{"burst-without-rate", goodSpec + "  limits: {perClient: {burst: 5}}\n", []string{"spec.limits.perClient.burst", "burst needs rate"}},
		{"rate-zero", goodSpec + "  limits: {perClient: {rate: 0}}\n", []string{"spec.limits.perClient.rate", "at least 0.01"}},
		{"rate-tiny", goodSpec + "  limits: {perClient: {rate: 0.001}}\n", []string{"spec.limits.perClient.rate", "greater than or equal to 0.01"}},
		{"max-concurrent-zero", goodSpec + "  limits: {perClient: {maxConcurrent: 0}}\n", []string{"spec.limits.perClient.maxConcurrent", "greater than or equal to 1"}},
		{"client-statement-timeout-days", goodSpec + "  limits: {perClient: {statementTimeout: 1d}}\n", []string{"spec.limits.perClient.statementTimeout", "should match"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, err := kubectl(t, dataSource(ns, tc.name, tc.spec), "apply", "-f", "-")
			if err == nil {
				t.Fatalf("accepted; want a rejection naming %v", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("rejection does not mention %q:\n%s", w, stderr)
				}
			}
		})
	}
	// Nothing bad was stored.
	out, _, err := kubectl(t, "", "get", "datasources", "-n", ns, "-o", "name")
	if err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("bad DataSources were stored: %q (%v)", out, err)
	}
}

// Good DataSources are accepted, defaults are filled in by the schema, and
// the printer columns and short name work.
func TestDataSourceSchemaAcceptsGoodResources(t *testing.T) {
	c := client(t)
	applyCRD(t)
	ns := tempNamespace(t, c, "schema-ok")
	good := map[string]string{
		"full":    goodSpec,
		"minimal": "  host: 10.0.0.12\n  database: analytics\n  user: bi\n  passwordSecretRef: {name: analytics, key: pw}\n",
		"ipv6":    "  host: \"fd00::12\"\n  database: x\n  user: reporter\n  passwordSecretRef: {name: s, key: k}\n",
		"verify-full": "  host: db.internal\n  database: x\n  user: reporter\n  passwordSecretRef: {name: s, key: k}\n" +
			"  tls: {mode: verify-full, caSecretRef: {name: ca, key: ca.crt}}\n  pool: {minIdle: 0, maxSize: 1000}\n  paused: true\n",
		"database-63-bytes": withField("database", "database: "+strings.Repeat("é", 31)+"x"),
		"legacy-auth-tls":   withField("tls", "tls: {mode: require}") + "  allowLegacyPasswordAuth: true\n",
		"limits":            goodSpec + "  limits: {maxQueued: 0, noticeAfter: 500ms, fairness: Arrival, perClient: {maxConcurrent: 4, rate: 0.5, burst: 2, statementTimeout: 30s}}\n",
	}
	for name, spec := range good {
		if _, stderr, err := kubectl(t, dataSource(ns, name, spec), "apply", "-f", "-"); err != nil {
			t.Errorf("%s rejected: %v\n%s", name, err, stderr)
		}
	}
	out, _, err := kubectl(t, "", "get", "datasource", "minimal", "-n", ns, "-o", "jsonpath={.spec.port} {.spec.pool.minIdle} {.spec.pool.maxSize} {.spec.tls.mode} {.spec.pool.connectTimeout} {.spec.limits.maxQueued} {.spec.limits.noticeAfter} {.spec.limits.fairness}")
	if err != nil || out != "5432 1 10 prefer 10s 1000 2s Fair" {
		t.Errorf("defaults: got %q (%v), want \"5432 1 10 prefer 10s 1000 2s Fair\"", out, err)
	}
	var header string
	eventually(t, 10*time.Second, "kubectl get dsrc lists the sources", func() (bool, error) {
		// `ds` is also DaemonSets' short name, which kubectl prefers; `dsrc` is unambiguous.
		out, _, err := kubectl(t, "", "get", "dsrc", "-n", ns)
		if err != nil {
			return false, err
		}
		header = strings.SplitN(out, "\n", 2)[0]
		return strings.Count(out, "\n") == len(good)+1, nil
	})
	for _, col := range []string{"NAME", "SHARD", "PHASE", "OPEN", "AGE"} {
		if !strings.Contains(header, col) {
			t.Errorf("printer columns %q lack %s", header, col)
		}
	}
}

// kubectl explain teaches the resource from the schema's descriptions.
func TestDataSourceExplain(t *testing.T) {
	applyCRD(t)
	var out string
	eventually(t, 20*time.Second, "kubectl explain datasource.spec.pool", func() (bool, error) {
		o, _, err := kubectl(t, "", "explain", "datasource.spec.pool")
		out = o
		return err == nil && strings.Contains(o, "minIdle"), err
	})
	for _, want := range []string{"minIdle", "Connections kept open even when idle", "maxSize", "acquireTimeout", "ms, s, m, h"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl explain datasource.spec.pool lacks %q:\n%s", want, out)
		}
	}
}

// The condition reasons and phases are explained by kubectl, the short
// name is dsrc (not ds, which kubectl resolves to DaemonSets), and -o wide
// adds the warehouse host and database.
func TestDataSourceKubectlView(t *testing.T) {
	installed(t)
	var out string
	eventually(t, 20*time.Second, "kubectl explain datasource.status.conditions", func() (bool, error) {
		o, _, err := kubectl(t, "", "explain", "datasource.status.conditions")
		out = o
		return err == nil && strings.Contains(o, "PoolWarm"), err
	})
	for _, want := range []string{"Assigned", "PoolWarm", "Connecting", "ConnectionErrors", "CannotConnect", "NotServing"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl explain datasource.status.conditions lacks the reason %q:\n%s", want, out)
		}
	}
	phase, _, err := kubectl(t, "", "explain", "datasource.status.phase")
	if err != nil || !strings.Contains(phase, "Degraded (serving, but below") {
		t.Errorf("kubectl explain datasource.status.phase does not describe the phases: %v\n%s", err, phase)
	}
	wide, stderr, err := kubectl(t, "", "-n", "tenants", "get", "dsrc", "acme", "-o", "wide")
	if err != nil {
		t.Fatalf("kubectl get dsrc -o wide: %v\n%s", err, stderr)
	}
	lines := strings.Split(strings.TrimSpace(wide), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "HOST") || !strings.Contains(lines[0], "DATABASE") ||
		!strings.Contains(lines[1], os.Getenv("WAREHOUSE_PGHOST")) || !strings.Contains(lines[1], " acme ") {
		t.Errorf("-o wide lacks host and database:\n%s", wide)
	}
	narrow, _, _ := kubectl(t, "", "-n", "tenants", "get", "dsrc", "acme")
	if strings.Contains(narrow, "HOST") {
		t.Errorf("host shown without -o wide:\n%s", narrow)
	}
	names, _, err := kubectl(t, "", "get", "crd", "datasources.shardpool.dev", "-o", "jsonpath={.spec.names.shortNames}")
	if err != nil || strings.Contains(names, `"ds"`) || !strings.Contains(names, `"dsrc"`) {
		t.Errorf("short names %s (%v): want dsrc and not ds", names, err)
	}
}
