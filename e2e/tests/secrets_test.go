package tests

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func applySecret(t *testing.T, ns, name, password string) {
	t.Helper()
	m := fmt.Sprintf("apiVersion: v1\nkind: Secret\nmetadata: {name: %s, namespace: %s}\nstringData: {password: %q}\n", name, ns, password)
	if _, stderr, err := kubectl(t, m, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply secret: %v\n%s", err, stderr)
	}
}

// A rotated Secret is used for new connections while open ones carry on;
// a wrong password turns the source to Error with a clear message that
// holds no secret, and other sources are unaffected.
func TestSecretRotationAndWrongPassword(t *testing.T) {
	ip, pw := installed(t)
	p1, p2, wrong := "rot-first-Aa1", "rot-second-Bb2", "rot-wrong-Cc3"
	role := fmt.Sprintf("rot_%d", time.Now().UnixNano()%1000000)
	warehouse(t, "acme", "CREATE ROLE "+role+" LOGIN PASSWORD '"+p1+"'")
	warehouse(t, "acme", "GRANT SELECT ON orders TO "+role)
	t.Cleanup(func() {
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "datasource", "rotating", "--wait=false")
	})
	applySecret(t, "tenants", "rotating-secret", p1)
	ds := fmt.Sprintf(`apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: rotating, namespace: tenants}
spec: {host: %s, port: %s, database: acme, user: %s, passwordSecretRef: {name: rotating-secret, key: password}, tls: {mode: disable}, pool: {minIdle: 1, maxSize: 6, acquireTimeout: 10s}}
`, os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), role)
	if _, stderr, err := kubectl(t, ds, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	eventually(t, 30*time.Second, "rotating source Ready", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "rotating", "-o", "jsonpath={.status.phase}")
		return out == "Ready", err
	})
	before := warehouse(t, "postgres", "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE usename = '"+role+"'")

	// Rotate: the database first, then the Secret.
	warehouse(t, "acme", "ALTER ROLE "+role+" PASSWORD '"+p2+"'")
	applySecret(t, "tenants", "rotating-secret", p2)
	time.Sleep(3 * time.Second) // the shard notices within one status pass (2 s)

	// Six concurrent transactions need five new connections, opened with p2.
	var wg sync.WaitGroup
	errs := make(chan error, 6)
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := pgxConn(t, ip, pw, "tenants.rotating", pgx.QueryExecModeSimpleProtocol)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close(context.Background())
			var n int
			errs <- conn.QueryRow(context.Background(), "SELECT count(*) FROM orders, pg_sleep(1)").Scan(&n)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("query after rotation: %v", err)
		}
	}
	after := warehouse(t, "postgres", "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE usename = '"+role+"'")
	if !strings.Contains(","+after+",", ","+before+",") {
		t.Errorf("the connection opened before the rotation was dropped: before %s, after %s", before, after)
	}

	// A wrong password: new connections fail, the source reports why.
	applySecret(t, "tenants", "rotating-secret", wrong)
	time.Sleep(3 * time.Second)
	warehouse(t, "postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '"+role+"'")
	var lastErr string
	eventually(t, 60*time.Second, "source in Error with a clear message", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "rotating", "-o", "jsonpath={.status.phase}|{.status.lastError}")
		phase, msg, _ := strings.Cut(out, "|")
		lastErr = msg
		return (phase == "Error" || phase == "Degraded") && strings.Contains(msg, "28P01"), err
	})
	if strings.Contains(lastErr, wrong) || strings.Contains(lastErr, p2) || strings.Contains(lastErr, p1) {
		t.Fatalf("lastError leaks a password: %q", lastErr)
	}
	t.Logf("lastError with a wrong password: %q", lastErr)
	// Other sources are unaffected.
	if out, _, err := psqlRouter(t, ip, pw, "tenants.acme", "-c", "SELECT count(*) FROM orders"); err != nil || strings.TrimSpace(out) != "500" {
		t.Fatalf("another source failed while one had a wrong password: %v %q", err, out)
	}
}

// A DataSource whose Secret is missing (or lacks the key) gets phase Error,
// a Ready=False condition and a lastError naming the Secret, while the
// other sources keep answering; creating the Secret later heals it.
func TestMissingSecretIsReportedNotStalling(t *testing.T) {
	ip, pw := installed(t)
	t.Cleanup(func() {
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "datasource", "nosecret", "--wait=false")
		_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "secret", "nosecret-later", "--wait=false")
	})
	_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "secret", "nosecret-later", "--ignore-not-found")
	ds := fmt.Sprintf(`apiVersion: shardpool.dev/v1alpha1
kind: DataSource
metadata: {name: nosecret, namespace: tenants}
spec: {host: %s, port: %s, database: acme, user: acme_bi, passwordSecretRef: {name: nosecret-later, key: password}, pool: {minIdle: 1, maxSize: 2}}
`, os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"))
	if _, stderr, err := kubectl(t, ds, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	var got string
	eventually(t, 30*time.Second, "missing Secret reported as Error", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "nosecret", "-o",
			`jsonpath={.status.phase}|{.status.conditions[?(@.type=="Ready")].status}|{.status.lastError}`)
		got = out
		parts := strings.SplitN(out, "|", 3)
		return len(parts) == 3 && parts[0] == "Error" && parts[1] == "False" && strings.Contains(parts[2], "nosecret-later"), err
	})
	t.Logf("missing Secret: %s", got)
	if out, _, err := psqlRouter(t, ip, pw, "tenants.acme", "-c", "SELECT count(*) FROM orders"); err != nil || strings.TrimSpace(out) != "500" {
		t.Fatalf("another source failed while one had no Secret: %v %q", err, out)
	}
	// The Secret appears (with acme_bi's password): the source heals.
	applySecret(t, "tenants", "nosecret-later", installCredential(t, "acme-warehouse"))
	eventually(t, 60*time.Second, "source Ready once its Secret exists", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasource", "nosecret", "-o", "jsonpath={.status.phase}")
		return out == "Ready", err
	})
	if out, stderr, err := psqlRouter(t, ip, pw, "tenants.nosecret", "-c", "SELECT count(*) FROM orders"); err != nil || strings.TrimSpace(out) != "500" {
		t.Fatalf("healed source: %v %q\n%s", err, out, stderr)
	}
	// Both phase changes are Events on the DataSource (kubectl describe
	// shows them): Error with its reason, then Ready.
	var events string
	eventually(t, 30*time.Second, "Error and Ready Events on the DataSource", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", "tenants", "get", "events", "--field-selector", "involvedObject.kind=DataSource,involvedObject.name=nosecret",
			"-o", `jsonpath={range .items[*]}{.type}|{.reason}|{.message}{"\n"}{end}`)
		events = out
		return strings.Contains(out, "Warning|Error|") && strings.Contains(out, "Normal|Ready|"), err
	})
	t.Logf("events:\n%s", events)
	for _, line := range strings.Split(events, "\n") {
		if strings.HasPrefix(line, "Warning|Error|") && !strings.Contains(line, "(CannotConnect)") {
			t.Errorf("the Error Event does not give the condition's reason: %q", line)
		}
	}
}
