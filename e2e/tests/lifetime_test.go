package tests

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Connections that reach maxLifetime are renewed while a query load runs,
// and the renewal is upkeep nobody else has to hear of: no query fails or
// waits, the source stays Ready with no status write and no Event (at
// 72,000 connections renewed every hour, a phase flip per renewal would be
// thousands of API writes a minute), and the connections are renewed one
// at a time, so the warehouse never sees fewer than minIdle-1 of them.
func TestLifetimeRenewalIsQuietUnderLoad(t *testing.T) {
	installed(t)
	c := client(t)
	ns := tempNamespace(t, c, "lifetime")
	const minIdle, maxSize = 4, 6
	manifest := strings.Replace(warehouseSources(ns, "renew-%d", 1, minIdle, maxSize),
		fmt.Sprintf("maxSize: %d}", maxSize), fmt.Sprintf("maxSize: %d, maxLifetime: 3s}", maxSize), 1)
	if !strings.Contains(manifest, "maxLifetime: 3s") {
		t.Fatalf("manifest without maxLifetime:\n%s", manifest)
	}
	if _, stderr, err := kubectl(t, manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	get := func() (phase, rv string) {
		out, _, err := kubectl(t, "", "-n", ns, "get", "datasource", "renew-0", "-o", `jsonpath={.status.phase} {.metadata.resourceVersion}`)
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(out)
		if len(f) != 2 {
			return "", ""
		}
		return f[0], f[1]
	}
	eventually(t, 90*time.Second, "renew-0 Ready", func() (bool, error) {
		p, _ := get()
		return p == "Ready", fmt.Errorf("phase %q", p)
	})
	pidsOf := func() []string {
		out := warehouse(t, "postgres", "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'shardpool/"+ns+"/renew-0/%'")
		return strings.Fields(out)
	}
	// Let the status writes of the warm-up come back, then take the
	// version every later write would change.
	time.Sleep(3 * time.Second)
	_, rv := get()
	first := pidsOf()
	started := time.Now()
	load := routerLoad(t, ns, []string{"renew-0"}, 2, 20*time.Millisecond)
	seen := map[string]bool{}
	lowest, highest := 1<<30, 0
	for time.Since(started) < 20*time.Second {
		pids := pidsOf()
		for _, p := range pids {
			seen[p] = true
		}
		lowest, highest = min(lowest, len(pids)), max(highest, len(pids))
		time.Sleep(100 * time.Millisecond)
	}
	rep := load.Stop()
	_, rvAfter := get()
	last := pidsOf()
	renewed := 0
	for _, p := range first {
		if !slices.Contains(last, p) {
			renewed++
		}
	}
	longest := rep.Longest()
	t.Logf("maxLifetime 3s, minIdle %d, maxSize %d, 20 s under load: %d queries, %d failed, longest %.3fs; warehouse saw %d-%d connections of the source, %d distinct backends; %d of the %d first renewed",
		minIdle, maxSize, rep.Queries(), len(rep.Failed()), longest.End.Sub(longest.Start).Seconds(), lowest, highest, len(seen), renewed, len(first))
	if n := len(rep.Failed()); n > 0 {
		t.Errorf("%d queries failed during renewal, first: %+v", n, rep.Failed()[0])
	}
	if d := longest.End.Sub(longest.Start); d > 2*time.Second {
		t.Errorf("a query waited %v during renewal", d)
	}
	if len(first) < minIdle || renewed != len(first) {
		t.Errorf("%d of the first %d connections renewed after 20 s with maxLifetime 3s", renewed, len(first))
	}
	if len(seen) < 3*minIdle {
		t.Errorf("only %d distinct backends in 20 s with maxLifetime 3s: not renewed", len(seen))
	}
	// One connection at a time: never more than one below minIdle (a
	// sample may also catch a closed backend still exiting beside its
	// replacement, so up to maxSize above).
	if highest > maxSize || lowest < minIdle-1 {
		t.Errorf("the warehouse saw between %d and %d connections of the source (want %d-%d: renewal one at a time)", lowest, highest, minIdle-1, maxSize)
	}
	if rvAfter != rv {
		t.Errorf("the DataSource was written during renewal (resourceVersion %s -> %s): the phase must not flip", rv, rvAfter)
	}
	evs, err := c.EventsV1().Events(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs.Items {
		if e.Regarding.Name == "renew-0" && e.CreationTimestamp.Time.After(started) {
			t.Errorf("Event during renewal: %s %s", e.Reason, e.Note)
		}
	}
}
