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

// PostgreSQL clients may reach the router over TLS (its certificate from the
// Secret the chart names): psql with sslmode=verify-full against the
// router's CA and Service name connects over TLS and queries; a wrong name
// is refused by the client's check; plain connections still work (TLS not
// required by default).
func TestRouterClientTLS(t *testing.T) {
	ip, pw := installed(t)
	ca := filepath.Join(stateDir(), "install", "router-ca.crt")
	run := func(conninfo string, args ...string) (string, string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		full := append([]string{"-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo}, args...)
		cmd := exec.CommandContext(ctx, "psql", full...)
		cmd.Env = append(os.Environ(), "PGPASSWORD="+pw)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		return out.String(), errb.String(), err
	}
	base := fmt.Sprintf("hostaddr=%s port=5432 user=bi dbname=tenants.acme connect_timeout=10", ip)
	verified := base + " host=shardpool-router.shardpool-system.svc sslmode=verify-full sslrootcert=" + ca
	out, stderr, err := run(verified, "-c", `\conninfo`, "-c", "SELECT count(*) FROM orders")
	if err != nil {
		t.Fatalf("verify-full: %v\n%s", err, stderr)
	}
	if !strings.Contains(out, "SSL connection") || !strings.Contains(out, "500") {
		t.Fatalf("verify-full: not TLS or wrong answer:\n%s", out)
	}
	t.Logf("router TLS: %s", strings.SplitN(out, "\n", 3)[1])
	if _, stderr, err := run(base+" host=wrong-name.example sslmode=verify-full sslrootcert="+ca, "-c", "SELECT 1"); err == nil || !strings.Contains(stderr, "does not match") {
		t.Errorf("a wrong host name must fail verification: %v\n%s", err, stderr)
	}
	if out, stderr, err := run(base+" host=x sslmode=disable", "-c", "SELECT 1"); err != nil || strings.TrimSpace(out) != "1" {
		t.Errorf("plain connection: %v %q\n%s", err, out, stderr)
	}
}
