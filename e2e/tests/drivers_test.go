package tests

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// pythonWithPsycopg makes (once) a virtualenv in e2e/.bin/py with the
// pinned psycopg from e2e/drivers/requirements.txt; returns its python.
func pythonWithPsycopg(t *testing.T) string {
	t.Helper()
	venv := filepath.Join(repoRoot(), "e2e", ".bin", "py")
	py := filepath.Join(venv, "bin", "python")
	req := filepath.Join(repoRoot(), "e2e", "drivers", "requirements.txt")
	want, err := os.ReadFile(req)
	if err != nil {
		t.Fatal(err)
	}
	stamp := filepath.Join(venv, "requirements.txt")
	if have, err := os.ReadFile(stamp); err == nil && string(have) == string(want) {
		return py
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	for _, args := range [][]string{
		{"python3", "-m", "venv", "--clear", venv},
		{py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", req},
	} {
		if out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	if err := os.WriteFile(stamp, want, 0o644); err != nil {
		t.Fatal(err)
	}
	return py
}

// psycopg 3 (Python) runs simple, parameterised, binary, prepared,
// transactional, failing and cancelled queries through the router; each
// check is in e2e/drivers/psycopg_check.py.
func TestPsycopgThroughTheRouter(t *testing.T) {
	ip, pw := installed(t)
	py := pythonWithPsycopg(t)
	sum := warehouse(t, "acme", "SELECT sum(amount)::text FROM orders")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, filepath.Join(repoRoot(), "e2e", "drivers", "psycopg_check.py"))
	cmd.Env = append(os.Environ(), "ROUTER_HOST="+ip, "ROUTER_USER=bi", "ROUTER_PASSWORD="+pw, "ROUTER_DB=tenants.acme", "EXPECT_SUM="+sum)
	out, err := cmd.CombinedOutput()
	t.Logf("psycopg:\n%s", out)
	if err != nil {
		t.Fatalf("psycopg checks failed: %v", err)
	}
	if !strings.Contains(string(out), "0 failed") {
		t.Fatalf("psycopg checks did not finish")
	}
}

// tokio-postgres (Rust) runs simple, prepared (binary parameters),
// transactional, failing and cancelled queries through the router; each
// check is in e2e/drivers/tokio_postgres_check.rs.
func TestTokioPostgresThroughTheRouter(t *testing.T) {
	ip, pw := installed(t)
	count := warehouse(t, "acme", "SELECT count(*) FROM orders")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "cargo", "run", "--locked", "-q", "--example", "tokio-postgres-check")
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), "ROUTER_HOST="+ip, "ROUTER_USER=bi", "ROUTER_PASSWORD="+pw, "ROUTER_DB=tenants.acme", "EXPECT_COUNT="+count)
	out, err := cmd.CombinedOutput()
	t.Logf("tokio-postgres:\n%s", out)
	if err != nil {
		t.Fatalf("tokio-postgres checks failed: %v", err)
	}
	if !strings.Contains(string(out), "0 failed") {
		t.Fatalf("tokio-postgres checks did not finish")
	}
}
