package tests

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// 200 sources come up with exactly minIdle connections each, every one
// visible in pg_stat_activity under its own application_name from the
// shard it is assigned to, and a sample answers through the router.
func TestTwoHundredSourcesWarmExactlyOnce(t *testing.T) {
	ip, pw := installed(t)
	c := client(t)
	ns := tempNamespace(t, c, "many")
	const n = 200
	manifest := warehouseSources(ns, "w%03d", n, 1, 3)
	start := time.Now()
	if _, stderr, err := kubectl(t, manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	var ready time.Duration
	eventually(t, 120*time.Second, "200 sources Ready", func() (bool, error) {
		out, _, err := kubectl(t, "", "-n", ns, "get", "datasources", "-o", `jsonpath={range .items[*]}{.status.phase}{"\n"}{end}`)
		if err != nil {
			return false, err
		}
		if strings.Count(out, "Ready") == n {
			ready = time.Since(start)
			return true, nil
		}
		return false, fmt.Errorf("%d Ready", strings.Count(out, "Ready"))
	})
	t.Logf("200 sources applied -> all Ready in %s", ready.Round(time.Millisecond))
	out, _, err := kubectl(t, "", "-n", ns, "get", "datasources", "-o", `jsonpath={range .items[*]}{.metadata.name} {.status.shard}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 {
			want[ns+"/"+f[0]] = f[1]
		}
	}
	eventually(t, 30*time.Second, "exactly one connection per source, from its own shard", func() (bool, error) {
		rows := warehouse(t, "postgres", "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'shardpool/"+ns+"/%'")
		count := map[string]int{}
		for _, app := range strings.Split(rows, "\n") {
			src, shard, _, ok := appOwner(app)
			if !ok {
				continue
			}
			if want[src] != shard {
				return false, fmt.Errorf("unexpected connection %s (source assigned to shard %q)", app, want[src])
			}
			count[src]++
		}
		for src, c := range count {
			if c != 1 {
				return false, fmt.Errorf("%s has %d connections, want 1", src, c)
			}
		}
		return len(count) == n, fmt.Errorf("%d of %d sources have their connection", len(count), n)
	})
	// A sample answers through the router (user ops may use every
	// namespace), and bi, scoped to tenants, cannot see them.
	ops := opsPassword(t)
	for _, i := range []int{0, 57, 123, 199} {
		db := fmt.Sprintf("%s.w%03d", ns, i)
		if out, stderr, err := psqlRouterAs(t, "ops", ip, ops, db, "-c", "SELECT count(*) FROM orders"); err != nil || strings.TrimSpace(out) != "500" {
			t.Fatalf("%s through the router: %v %q %s", db, err, out, stderr)
		}
	}
	if _, stderr, err := psqlRouter(t, ip, pw, ns+".w000", "-c", "SELECT 1"); err == nil || !strings.Contains(stderr, "does not exist") {
		t.Fatalf("bi reached a namespace outside its scope: %v %s", err, stderr)
	}
}
