package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Server connections use TLS as each source's tls mode says (the local
// warehouse offers TLS with a certificate from its own CA): verify-full
// with the CA from a Secret (the globex example) and require run TLS,
// disable does not, and verify-full against the wrong CA is refused with
// an Error that says why, while the others keep answering.
func TestWarehouseTLSModes(t *testing.T) {
	ip, pw := installed(t)
	if os.Getenv("WAREHOUSE_CA") == "" {
		t.Fatal("WAREHOUSE_CA is not set: the local cluster predates warehouse TLS; run make down, then make test")
	}
	sslOf := func(name string) string {
		return warehouse(t, "postgres", fmt.Sprintf("SELECT coalesce(string_agg(DISTINCT ssl::text, ','), 'none') FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name LIKE 'shardpool/tenants/%s/%%'", name))
	}
	// The example globex: verify-full.
	eventually(t, 30*time.Second, "globex's connections run TLS", func() (bool, error) {
		got := sslOf("globex")
		return got == "true", fmt.Errorf("globex ssl: %s", got)
	})
	if out, stderr, err := psqlRouter(t, ip, pw, "tenants.globex", "-c", "SELECT count(*) FROM shipments"); err != nil || strings.TrimSpace(out) == "" {
		t.Fatalf("globex over verify-full: %v %q\n%s", err, out, stderr)
	}
	// acme: disable.
	if got := sslOf("acme"); got != "false" {
		t.Errorf("acme (tls disable) connections: ssl %s", got)
	}

	t.Cleanup(func() {
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "datasource", "tls-require", "tls-wrong-ca", "--wait=false")
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "secret", "wrong-ca", "--wait=false")
	})
	// A CA that did not sign the warehouse's certificate: the cluster's own.
	kubeCA := filepath.Join(stateDir(), "pki", "ca.crt")
	if _, err := os.Stat(kubeCA); err != nil {
		t.Fatalf("cluster CA: %v", err)
	}
	if _, stderr, err := kubectl(t, "", "-n", "tenants", "create", "secret", "generic", "wrong-ca", "--from-file=ca.crt="+kubeCA); err != nil && !strings.Contains(stderr, "AlreadyExists") {
		t.Fatalf("wrong-ca secret: %v\n%s", err, stderr)
	}
	src := func(name, tls string) string {
		return fmt.Sprintf(`apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: %s, namespace: tenants}
spec: {host: %s, port: %s, database: acme, user: acme_bi, passwordSecretRef: {name: acme-warehouse, key: password}, tls: %s, pool: {minIdle: 1, maxSize: 2}}
`, name, os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), tls)
	}
	manifest := src("tls-require", "{mode: require}") + "---\n" + src("tls-wrong-ca", "{mode: verify-full, caSecretRef: {name: wrong-ca, key: ca.crt}}")
	if _, stderr, err := kubectl(t, manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	eventually(t, 30*time.Second, "tls-require Ready over TLS", func() (bool, error) {
		phase, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "tls-require", "-o", "jsonpath={.status.phase}")
		return phase == "Ready" && sslOf("tls-require") == "true", err
	})
	var lastErr string
	eventually(t, 30*time.Second, "tls-wrong-ca in Error naming the certificate problem", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "tls-wrong-ca", "-o", "jsonpath={.status.phase}|{.status.lastError}")
		phase, msg, _ := strings.Cut(out, "|")
		lastErr = msg
		return phase == "Error" && strings.Contains(strings.ToLower(msg), "certificate"), err
	})
	t.Logf("verify-full with the wrong CA: %q", lastErr)
	if got := sslOf("tls-wrong-ca"); got != "none" {
		t.Errorf("a source whose certificate check failed has connections: %s", got)
	}
	if out, _, err := psqlRouter(t, ip, pw, "tenants.tls-require", "-c", "SELECT count(*) FROM orders"); err != nil || strings.TrimSpace(out) != "500" {
		t.Errorf("tls-require through the router: %v %q", err, out)
	}
}
