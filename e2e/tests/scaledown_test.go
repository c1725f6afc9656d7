package tests

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"
)

// bench/scale.sh scaled down to run in every `make test`: 300 sources with
// 4 warm connections each over 3 shards, created at once. Every source
// comes up with exactly 4 server connections, all from one process of the
// shard it is assigned to (pg_stat_activity), no shard opens more at once
// than its connect limit, and a rollout of every shard under load on 30 of
// the sources fails no query, holds none over 5 s (the benchmark's target
// is 2 s), and at no sample shows a source above its 4 connections or with
// two owners.
func TestScaledDownRolloutUnderLoad(t *testing.T) {
	installed(t)
	c := client(t)
	ns := tempNamespace(t, c, "scaled")
	port, err := strconv.Atoi(os.Getenv("WAREHOUSE_PGPORT"))
	if err != nil {
		t.Fatalf("WAREHOUSE_PGPORT: %v", err)
	}
	s := scaleSpec{
		N: 300, Conns: 4, MaxSize: 6,
		Host: os.Getenv("WAREHOUSE_PGHOST"), Ports: []int{port},
		Database: "acme", User: os.Getenv("WAREHOUSE_PGUSER"), Password: os.Getenv("WAREHOUSE_PGPASSWORD"),
	}
	t.Cleanup(func() { helmSet(t, "shard.count=2") })
	helmSet(t, "shard.count=3")
	eventually(t, 120*time.Second, "3 shards running, each holding its Lease", func() (bool, error) {
		why := shardsSettled(t, 3, nil)
		if why == "" {
			why = shardLeasesHeld(t, 3)
		}
		return why == "" && len(procsOf(t, "shard")) == 3, fmt.Errorf("%s", why)
	})
	r := newReporter(t)
	w := watchSources(t, ns)

	up := scaleUp(t, ns, s, w, 180*time.Second)
	r.say("%d sources x %d connections over 3 shards: assigned %.1f s, Ready %.1f s after the first create", s.N, s.Conns, up.assigned.Seconds(), up.ready.Seconds())
	for pod, peak := range up.peak {
		if peak > up.limit || peak < 1 {
			t.Errorf("%s opened at most %.0f connections at once; want 1..%.0f (its limit)", pod, peak, up.limit)
		}
	}
	var tally connTally
	eventually(t, 30*time.Second, "exactly 4 connections per source, one owner of its shard", func() (bool, error) {
		var err error
		if tally, _, err = sampleConns(t.Context(), s, ns); err != nil {
			return false, err
		}
		bad := checkTally(tally, w.snapshot(), ns, s.Conns)
		if len(bad) > 0 {
			return false, fmt.Errorf("%d sources wrong, first: %v", len(bad), bad[:min(len(bad), 3)])
		}
		return true, nil
	})

	var loaded []string
	for i := 0; i < s.N; i += 10 {
		loaded = append(loaded, s.name(i))
	}
	before := templateHashes(t)
	roll := underLoad(t, ns, s, routerLoad(t, ns, loaded, 2, 100*time.Millisecond), func() {
		helmSet(t, fmt.Sprintf("shard.podAnnotations.rev=r%d", time.Now().Unix()))
	}, func() string {
		if why := shardsSettled(t, 3, before); why != "" {
			return why
		}
		if _, ready := w.counts(int64(s.Conns)); ready != s.N {
			return fmt.Sprintf("%d of %d Ready with %d connections", ready, s.N, s.Conns)
		}
		return ""
	}, 5*time.Minute)
	r.say("rollout of 3 shards under load: %.0f s; %s", roll.took.Seconds(), roll.report.Summary())
	reportLoad(t, r, roll, s)
	// The benchmark's target is 2 s; here, on a CI machine shared with the
	// whole suite, a query held over 5 s is a regression.
	if longest := roll.report.Longest(); longest.End.Sub(longest.Start) > 5*time.Second {
		t.Errorf("a query was held %s (over 5 s): %+v", longest.End.Sub(longest.Start), longest)
	}
	if len(roll.handover) == 0 {
		t.Error("no loaded source changed owner: the rollout did not move the pools")
	}
	eventually(t, 30*time.Second, "exactly 4 connections per source after the rollout", func() (bool, error) {
		var err error
		if tally, _, err = sampleConns(t.Context(), s, ns); err != nil {
			return false, err
		}
		bad := checkTally(tally, w.snapshot(), ns, s.Conns)
		return len(bad) == 0, fmt.Errorf("%d sources wrong: %v", len(bad), bad[:min(len(bad), 3)])
	})
}
