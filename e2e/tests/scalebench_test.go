//go:build scalebench

package tests

// The scale benchmark's measuring part; bench/scale.sh prepares the
// cluster and the PgBouncer fronts, then runs
//
//	go test -tags scalebench -run TestScaleBench ./tests/
//
// with SCALE_* in the environment (see bench/scale.sh), and keeps what it
// says in SCALE_OUT.

import (
	"context"
	"fmt"
	"maps"
	"math/rand"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

func TestScaleBench(t *testing.T) {
	var ports []int
	for _, p := range strings.Fields(os.Getenv("SCALE_FRONT_PORTS")) {
		n, err := strconv.Atoi(p)
		if err != nil {
			t.Fatalf("SCALE_FRONT_PORTS: %v", err)
		}
		ports = append(ports, n)
	}
	if len(ports) == 0 {
		t.Fatal("SCALE_FRONT_PORTS is empty: run bench/scale.sh")
	}
	s := scaleSpec{
		N:             envInt(t, "SCALE_N", 6000),
		Conns:         envInt(t, "SCALE_CONNS", 12),
		MaxSize:       envInt(t, "SCALE_MAX", 16),
		Host:          "127.0.0.1",
		Ports:         ports,
		Fronts:        true,
		AdminPassword: os.Getenv("SCALE_ADMIN_PASSWORD"),
		Database:      os.Getenv("SCALE_DATABASE"),
		User:          os.Getenv("SCALE_USER"),
		Password:      os.Getenv("SCALE_PASSWORD"),
	}
	readyLimit := time.Duration(envInt(t, "SCALE_READY_LIMIT", 600)) * time.Second
	steadyWindow := time.Duration(envInt(t, "SCALE_STEADY_SECONDS", 60)) * time.Second
	r := newReporter(t)
	c := client(t)
	ns := tempNamespace(t, c, "scale")
	w := watchSources(t, ns)

	// 1. Everything at once.
	up := scaleUp(t, ns, s, w, readyLimit)
	conns := s.N * s.Conns
	r.say("sources: %d with minIdle %d, maxSize %d; %d warm connections wanted; %d shards; %d PgBouncer fronts", s.N, s.Conns, s.MaxSize, conns, len(up.peak), len(ports))
	r.say("create of %d DataSources (16 requests in flight): %.1f s", s.N, up.created.Seconds())
	r.say("first create -> every source assigned: %.1f s (target 20 s); %.1f s after the last create", up.assigned.Seconds(), (up.assigned - up.created).Seconds())
	r.say("first create -> every source Ready with %d connections: %.1f s (target 90 s); %.1f s after the last create", s.Conns, up.ready.Seconds(), (up.ready - up.created).Seconds())
	names := slices.Sorted(maps.Keys(up.peak))
	worst := 0.0
	for _, n := range names {
		worst = max(worst, up.peak[n])
	}
	r.say("connections being opened at the same moment: at most %.0f in one shard (its own high-water mark; limit %.0f), %.0f in all (largest sum of one round of 100 ms samples)", worst, up.limit, up.peakAll)
	if worst > up.limit {
		t.Errorf("a shard opened %.0f connections at once, above its limit %.0f", worst, up.limit)
	}

	// 2. The warehouse side: exactly Conns per source, one owner each.
	// Up to three samples 5 s apart, each reported: a miss that the next
	// sample does not repeat is the fronts' or the kernel table's moment,
	// not a pool (the twelfth full run found 124 listings missing once
	// while every shard's own pool metrics counted exactly Conns per
	// source). The target is judged on the last sample.
	var bad []string
	for attempt := 1; attempt <= 3; attempt++ {
		time.Sleep(5 * time.Second)
		tally, gone, err := sampleConns(context.Background(), s, ns)
		if err != nil {
			t.Fatalf("counting connections at the fronts: %v", err)
		}
		if gone > 0 {
			r.say("front listings no process of their owner holds at rest (PgBouncer still listing a closed client: no client end, or its port reused by another process; left out): %d", gone)
		}
		total := 0
		for _, owners := range tally {
			for _, n := range owners {
				total += n
			}
		}
		bad = checkTally(tally, w.snapshot(), ns, s.Conns)
		r.say("warehouse side (SHOW CLIENTS of the fronts), sample %d: %d connections of %d sources; %d sources not at exactly %d from one owner of their shard", attempt, total, len(tally), len(bad), s.Conns)
		if len(bad) == 0 {
			break
		}
		r.say("  first of them: %v", bad[:min(len(bad), 10)])
	}
	if len(bad) > 0 {
		t.Errorf("connections per source in the last sample: %v", bad[:min(len(bad), 10)])
	}

	// 3. Memory of every process.
	served := map[string]int{}
	for _, st := range w.snapshot() {
		served[st.servedBy]++
	}
	// Per shard: its RSS growth since before the sources over its
	// connections.
	var allGrowth []float64
	for _, role := range []string{"shard", "router", "operator"} {
		procs := procsOf(t, role)
		pods := slices.Sorted(maps.Keys(procs))
		for _, n := range pods {
			rss := rssKiB(t, procs[n].pid)
			line := fmt.Sprintf("RSS %s %s: %d KiB", role, n, rss)
			if role == "shard" {
				before := up.rssBefore[n]
				k := served[n]
				if k > 0 {
					line += fmt.Sprintf(" (before the sources %d KiB; %d sources, %d connections: %.1f KiB per source with its connections, %.1f KiB per connection counting all growth)",
						before, k, k*s.Conns, float64(rss-before)/float64(k), float64(rss-before)/float64(k*s.Conns))
					allGrowth = append(allGrowth, float64(rss-before)/float64(k*s.Conns))
				}
			}
			r.say("%s", line)
		}
	}

	// Memory per source and per connection: RSS against open connections
	// during the warm-up, once every source was assigned (a line per
	// shard: the slope is the cost of a connection, the intercept over
	// the RSS before the sources the cost of the sources without any).
	// A fit needs the samples to span a good part of the warm-up: when
	// the last assignment came late, the few samples after it sit at
	// nearly one connection count and their slope says nothing (it came
	// out negative). Then only the bound counting all growth is given.
	var perConn, perSource []float64
	for _, n := range names {
		a, b, ok := linearFit(up.mem[n])
		lo, hi := xSpan(up.mem[n])
		if !ok || served[n] == 0 || hi-lo < 0.25*float64(served[n]*s.Conns) {
			r.say("memory of %s: no fit: %d samples after the last assignment, between %.0f and %.0f open connections (a fit needs a quarter of the shard's %d)", n, len(up.mem[n]), lo, hi, served[n]*s.Conns)
			continue
		}
		ps := (a - float64(up.rssBefore[n])) / float64(served[n])
		perConn = append(perConn, b)
		perSource = append(perSource, ps)
		r.say("memory of %s: %.1f KiB per open connection, %.1f KiB per served source beyond its connections (%d samples of RSS against open connections during the warm-up)", n, b, ps, len(up.mem[n]))
	}
	if len(perConn) > 0 {
		sort.Float64s(perConn)
		sort.Float64s(perSource)
		r.say("memory of the shards (%d of %d fitted): per open connection %.1f-%.1f KiB (target under 24), per served source beyond its connections %.1f-%.1f KiB (target under 40)",
			len(perConn), len(names), perConn[0], perConn[len(perConn)-1], perSource[0], perSource[len(perSource)-1])
	} else {
		r.say("memory of the shards: no fit in this run (see above)")
	}
	if len(allGrowth) > 0 {
		sort.Float64s(allGrowth)
		r.say("memory of the shards counting all growth over the connections (an upper bound per connection: it includes every source's own cost): %.1f-%.1f KiB",
			allGrowth[0], allGrowth[len(allGrowth)-1])
	}

	// 4. Steady state.
	st := measureSteady(t, w, steadyWindow)
	r.say("steady state, %.0f s after everything was Ready:", st.window.Seconds())
	r.say("  writes to the %d DataSources (status or spec, seen by a watch): %.1f per minute (target 0)", s.N, st.sourceWrites)
	r.say("  Events written by shardpool's components: %.1f per minute", st.events)
	for _, line := range topCounts(st.writeKinds, 8) {
		r.say("    DataSource writes in the window, %s", line)
	}
	for _, line := range topCounts(st.eventKinds, 8) {
		r.say("    Events in the window, %s", line)
	}
	leases := slices.Sorted(maps.Keys(st.leaseRenewals))
	for _, k := range leases {
		r.say("  Lease %s renewed %.1f times per minute (the holder's heartbeat: one per shard and one for the operator, whatever the source count)", k, st.leaseRenewals[k])
	}
	res := slices.Sorted(maps.Keys(st.writes))
	for _, k := range res {
		r.say("  API server write requests per minute (apiserver_request_total, every client of the cluster), %s: %.1f", k, st.writes[k])
	}
	if st.sourceWrites > 0 {
		t.Errorf("%.1f DataSource writes per minute at steady state; want 0", st.sourceWrites)
	}
	r.say("operator reconcile pass at steady state: p50 <= %gs, p99 <= %gs (bucket bounds)", st.reconcileP50, st.reconcileP99)
	pods := slices.Sorted(maps.Keys(st.cpu))
	for _, n := range pods {
		r.say("CPU at steady state, %s: %.3f cores", n, st.cpu[n])
	}

	// SCALE_CHANGES=0 stops here: a run at CONNS=1 beside one at 12 splits
	// a shard's memory into sources and connections (the warm-up keeps
	// every source at its full count, so one run cannot).
	if envInt(t, "SCALE_CHANGES", 1) == 0 {
		r.say("rollout and rescale skipped (SCALE_CHANGES=0)")
		return
	}

	// 5. A rollout of every shard, under load.
	shards := len(up.peak)
	loaded := rand.Perm(s.N)[:min(200, s.N)]
	var names200 []string
	for _, i := range loaded {
		names200 = append(names200, s.name(i))
	}
	allReady := func() string {
		if _, ready := w.counts(int64(s.Conns)); ready != s.N {
			return fmt.Sprintf("%d of %d sources Ready with %d connections", ready, s.N, s.Conns)
		}
		return ""
	}
	clients := envInt(t, "SCALE_LOAD_CLIENTS", 2)
	before := templateHashes(t)
	roll := underLoad(t, ns, s, routerLoad(t, ns, names200, clients, 200*time.Millisecond), func() {
		helmSet(t, fmt.Sprintf("shard.podAnnotations.rev=r%d", time.Now().Unix()))
	}, func() string {
		if why := shardsSettled(t, shards, before); why != "" {
			return why
		}
		return allReady()
	}, 30*time.Minute)
	r.say("rollout of %d shards under load (%d sources x %d clients through the router): %.0f s", shards, len(names200), clients, roll.took.Seconds())
	reportLoad(t, r, roll, s)

	// 6. One shard more, under load.
	assignedBefore := map[string]string{}
	for n, st := range w.snapshot() {
		assignedBefore[n] = st.shard
	}
	movesBefore := w.movesSnapshot()
	resc := underLoad(t, ns, s, routerLoad(t, ns, names200, clients, 200*time.Millisecond), func() {
		helmSet(t, fmt.Sprintf("shard.count=%d", shards+1))
	}, func() string {
		if why := shardsSettled(t, shards+1, nil); why != "" {
			return why
		}
		if n := w.notAmong(shards + 1); n > 0 {
			return fmt.Sprintf("%d sources not yet placed among %d shards", n, shards+1)
		}
		return allReady()
	}, 30*time.Minute)
	moved, twice := 0, 0
	for n, st := range w.snapshot() {
		if st.shard != assignedBefore[n] {
			moved++
		}
	}
	for n, k := range w.movesSnapshot() {
		if k-movesBefore[n] > 1 {
			twice++
		}
	}
	r.say("rescale %d -> %d shards under load: %.0f s until every moved source was Ready on its new shard; %d sources moved (%.1f %%; goal near %.1f %%, target 9-14 %%), %d moved more than once",
		shards, shards+1, resc.took.Seconds(), moved, 100*float64(moved)/float64(s.N), 100/float64(shards+1), twice)
	reportLoad(t, r, resc, s)
	if twice > 0 {
		t.Errorf("%d sources moved more than once", twice)
	}
}

// topCounts lists the n largest counts as "count x key", largest first.
func topCounts(m map[string]int, n int) []string {
	keys := slices.SortedFunc(maps.Keys(m), func(a, b string) int {
		if m[a] != m[b] {
			return m[b] - m[a]
		}
		return strings.Compare(a, b)
	})
	var out []string
	for i, k := range keys {
		if i == n {
			out = append(out, fmt.Sprintf("%d more kinds", len(keys)-n))
			break
		}
		out = append(out, fmt.Sprintf("%d x %s", m[k], k))
	}
	return out
}
