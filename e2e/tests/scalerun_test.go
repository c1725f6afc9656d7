package tests

// The machinery of the scale benchmark (bench/scale.sh runs
// TestScaleBench, build tag scalebench) and of its scaled-down check in
// `make test`: the warm-up after many DataSources are created at once, the
// steady state after it, and a change (rollout, rescale) under a query load
// through the router. Its parts: the DataSources' watch in
// scalewatch_test.go, the warehouse-side connection count in
// scaleconns_test.go, the processes' memory, CPU and metrics in
// scaleprocs_test.go.

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"shardpool.dev/e2e/fault"
)

// reporter writes a run's figures to the test log and, when SCALE_OUT
// names a file, to that file.
type reporter struct {
	t *testing.T
	f *os.File
}

func newReporter(t *testing.T) *reporter {
	r := &reporter{t: t}
	if p := os.Getenv("SCALE_OUT"); p != "" {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		r.f = f
		t.Cleanup(func() { f.Close() })
	}
	return r
}

func (r *reporter) say(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	r.t.Log(line)
	if r.f != nil {
		fmt.Fprintln(r.f, line)
	}
}

// warmUp is what scaleUp measured.
type warmUp struct {
	// From the first create: every source created, assigned, Ready with
	// its connections.
	created, assigned, ready time.Duration
	// The most connections being opened at the same moment: per shard pod
	// (the shard's own high-water mark) and in all (the largest sum of one
	// round of samples).
	peak      map[string]float64
	peakAll   float64
	limit     float64
	rssBefore map[string]int
	// mem holds, per shard pod, samples of (server connections open, RSS
	// KiB) taken during the warm-up once every source was assigned.
	mem map[string][][2]float64
}

// xSpan is the least and the greatest x of pts (0, 0 for none).
func xSpan(pts [][2]float64) (lo, hi float64) {
	for i, p := range pts {
		if i == 0 || p[0] < lo {
			lo = p[0]
		}
		if i == 0 || p[0] > hi {
			hi = p[0]
		}
	}
	return lo, hi
}

// linearFit is the least-squares line y = a + b x through the points.
func linearFit(pts [][2]float64) (a, b float64, ok bool) {
	n := float64(len(pts))
	if n < 3 {
		return 0, 0, false
	}
	var sx, sy, sxx, sxy float64
	for _, p := range pts {
		sx += p[0]
		sy += p[1]
		sxx += p[0] * p[0]
		sxy += p[0] * p[1]
	}
	d := n*sxx - sx*sx
	if d == 0 {
		return 0, 0, false
	}
	b = (n*sxy - sx*sy) / d
	return (sy - b*sx) / n, b, true
}

// scaleUp creates the sources of `s` in ns at once and waits (up to
// `limit`) until every one is Ready with its connections, sampling the
// shards' connects in flight on the way.
func scaleUp(t *testing.T, ns string, s scaleSpec, w *sourceWatch, limit time.Duration) warmUp {
	t.Helper()
	res := warmUp{peak: map[string]float64{}, rssBefore: map[string]int{}, mem: map[string][][2]float64{}}
	var allAssigned sync.Once
	assignedNow := make(chan struct{})
	shards := procsOf(t, "shard")
	for name, p := range shards {
		res.rssBefore[name] = rssKiB(t, p.pid)
	}
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for round := 0; ; round++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			select {
			case <-assignedNow:
				if round%5 == 0 {
					// Memory against open connections, every 500 ms.
					for name, p := range shards {
						lines, err := metricLines(p.ip, "shardpool_pool_connections")
						if err != nil {
							continue
						}
						open := metricSum(lines, "shardpool_pool_connections")
						res.mem[name] = append(res.mem[name], [2]float64{open, float64(rssKiB(t, p.pid))})
					}
				}
			default:
			}
			all := 0.0
			for _, p := range shards {
				if lines, err := metricLines(p.ip, "shardpool_shard_connecting"); err == nil {
					all += metricSum(lines, "shardpool_shard_connecting")
				}
			}
			if all > res.peakAll {
				res.peakAll = all
			}
		}
	}()
	start := time.Now()
	createSources(t, ns, s, 16)
	res.created = time.Since(start)
	deadline := start.Add(limit)
	for {
		a, r := w.counts(int64(s.Conns))
		if res.assigned == 0 && a == s.N {
			res.assigned = time.Since(start)
			allAssigned.Do(func() { close(assignedNow) })
		}
		if r == s.N {
			res.ready = time.Since(start)
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			<-sampled
			phases := map[string]int{}
			for _, st := range w.snapshot() {
				phases[fmt.Sprintf("%s/open>=%v", st.phase, st.open >= int64(s.Conns))]++
			}
			t.Fatalf("after %s: %d of %d assigned, %d Ready with %d connections (%v)", limit, a, s.N, r, s.Conns, phases)
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	<-sampled
	for name, p := range shards {
		lines, err := metricLines(p.ip, "shardpool_shard_connect")
		if err != nil {
			t.Fatalf("%s metrics: %v", name, err)
		}
		res.peak[name] = metricSum(lines, "shardpool_shard_connecting_peak")
		res.limit = metricSum(lines, "shardpool_shard_connect_limit")
	}
	return res
}

// steadyState is what the cluster does for `window` once everything is
// Ready: API writes per resource, the operator's reconcile pass duration,
// and the CPU of every process.
type steadyState struct {
	window time.Duration
	// writes: the API server's write requests per minute by resource.
	writes map[string]float64
	// sourceWrites: changes to the run's DataSources per minute.
	sourceWrites float64
	// writeKinds: those changes by what they changed and who wrote them
	// (count in the window).
	writeKinds map[string]int
	// eventKinds: shardpool's Events in the window by reason and note.
	eventKinds map[string]int
	// leaseRenewals: writes per minute to each Lease of the release.
	leaseRenewals map[string]float64
	// events: Events per minute written by shardpool's components.
	events       float64
	reconcileP50 float64
	reconcileP99 float64
	cpu          map[string]float64 // pod -> CPU seconds per second
}

func measureSteady(t *testing.T, w *sourceWatch, window time.Duration) steadyState {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), window+time.Minute)
	defer cancel()
	leaseWatch, err := client(t).CoordinationV1().Leases(systemNS).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	renewals := map[string]int{}
	var renewalsMu sync.Mutex
	go func() {
		for ev := range leaseWatch.ResultChan() {
			if m, ok := ev.Object.(metav1.Object); ok && ev.Type == "MODIFIED" {
				renewalsMu.Lock()
				renewals[m.GetName()]++
				renewalsMu.Unlock()
			}
		}
	}()
	sw0 := w.writeCount()
	k0 := w.kindsSnapshot()
	eventsFrom := time.Now()
	procs := map[string]procInfo{}
	for _, role := range []string{"operator", "shard", "router"} {
		for n, p := range procsOf(t, role) {
			procs[n] = p
		}
	}
	opLines := func() []string {
		var all []string
		for n, p := range procs {
			if !strings.Contains(n, "operator") {
				continue
			}
			if l, err := metricLines(p.ip, "shardpool_operator_reconcile_duration_seconds"); err == nil {
				all = append(all, l...)
			}
		}
		return all
	}
	cpu0 := map[string]float64{}
	for n, p := range procs {
		cpu0[n] = cpuSeconds(p.pid)
	}
	w0 := apiWrites(t)
	h0 := readHistogram(opLines(), "shardpool_operator_reconcile_duration_seconds")
	start := time.Now()
	time.Sleep(window)
	elapsed := time.Since(start)
	w1 := apiWrites(t)
	h1 := readHistogram(opLines(), "shardpool_operator_reconcile_duration_seconds")
	res := steadyState{window: elapsed, writes: map[string]float64{}, cpu: map[string]float64{}}
	for k, v := range w1 {
		if d := v - w0[k]; d > 0 {
			res.writes[k] = d / elapsed.Minutes()
		}
	}
	leaseWatch.Stop()
	res.sourceWrites = float64(w.writeCount()-sw0) / elapsed.Minutes()
	res.writeKinds = map[string]int{}
	for k, v := range w.kindsSnapshot() {
		if d := v - k0[k]; d > 0 {
			res.writeKinds[k] = d
		}
	}
	res.eventKinds = map[string]int{}
	res.leaseRenewals = map[string]float64{}
	renewalsMu.Lock()
	for k, v := range renewals {
		res.leaseRenewals[k] = float64(v) / elapsed.Minutes()
	}
	renewalsMu.Unlock()
	evs, err := client(t).EventsV1().Events("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs.Items {
		if !strings.HasPrefix(e.ReportingController, "shardpool") {
			continue
		}
		last := e.EventTime.Time
		if e.Series != nil {
			last = e.Series.LastObservedTime.Time
		}
		if e.DeprecatedLastTimestamp.After(last) {
			last = e.DeprecatedLastTimestamp.Time
		}
		if last.After(eventsFrom) {
			res.events++
			note := e.Note
			if len(note) > 50 {
				note = note[:50]
			}
			res.eventKinds[e.Reason+" ("+note+")"]++
		}
	}
	res.events /= elapsed.Minutes()
	res.reconcileP50 = quantile(h0, h1, 0.5)
	res.reconcileP99 = quantile(h0, h1, 0.99)
	for n, p := range procs {
		res.cpu[n] = (cpuSeconds(p.pid) - cpu0[n]) / elapsed.Seconds()
	}
	return res
}

// loadResult is what a change made under load showed.
type loadResult struct {
	report fault.Report
	// took: from the change to settled.
	took time.Duration
	// samples of the warehouse side taken meanwhile.
	samples int
	// over: a source above its connections, or with two owners, in a
	// sample (must stay empty).
	over []string
	// owners2 counts the (source, sample) pairs of `over` with two owners
	// or more (the rest are one owner above the source's connections).
	owners2 int
	// atOnce: the pairs of `over` that were over at one moment, the start
	// or the end of the sample (see connSample); the rest of `over` only
	// counted both the closed and the opened connections of a change made
	// during the sample. atOnceOwners2: those of them with two owners.
	atOnce        []string
	atOnceOwners2 int
	// below counts (source, sample) pairs under the source's connections:
	// sources being handed over at that moment.
	below int
	// gone is the most front listings no process of their owner holds in one sample
	// (fronts only; left out of the tally, see frontListings).
	gone int
	// handover is, per shard the source was on before, per loaded source
	// that changed owner: from the old owner's last answer to the new
	// owner's first.
	handover map[string][]time.Duration
}

// routerLoad is the query load of the scale runs: `clients` clients on
// each of `sources` (names in ns) through the router as user ops, each
// asking which server connection answers it.
func routerLoad(t *testing.T, ns string, sources []string, clients int, pause time.Duration) *fault.Load {
	t.Helper()
	ip, _ := installed(t)
	ops := opsPassword(t)
	l := &fault.Load{
		Connect: func(ctx context.Context, db string) (*pgx.Conn, error) {
			cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=ops dbname=%s sslmode=disable connect_timeout=15", ip, db))
			if err != nil {
				return nil, err
			}
			cfg.Password = ops
			cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
			return pgx.ConnectConfig(ctx, cfg)
		},
		Query:       "SELECT current_setting('application_name')",
		Pause:       pause,
		Timeout:     30 * time.Second,
		KeepAnswers: true,
	}
	var dbs []string
	for _, s := range sources {
		dbs = append(dbs, ns+"."+s)
	}
	l.Start(dbs, clients)
	return l
}

// underLoad runs `change` while `load` runs and the warehouse side is
// sampled, and waits (up to `limit`) until `settled` says "" (else it says
// what is not settled yet). The load is stopped before returning.
func underLoad(t *testing.T, ns string, s scaleSpec, load *fault.Load, change func(), settled func() string, limit time.Duration) loadResult {
	t.Helper()
	var res loadResult
	stop := make(chan struct{})
	sampled := make(chan struct{})
	var sampleErr error
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			one, err := sampleSpan(ctx, s, ns)
			cancel()
			if err != nil {
				sampleErr = err
				time.Sleep(time.Second)
				continue
			}
			tally := one.all
			res.samples++
			res.gone = max(res.gone, one.gone)
			over := func(owners map[string]int) bool {
				total := 0
				for _, n := range owners {
					total += n
				}
				return len(owners) > 1 || total > s.Conns
			}
			at := time.Now().Format("15:04:05.000")
			for src, owners := range tally {
				if !over(owners) {
					continue
				}
				res.over = append(res.over, fmt.Sprintf("%s %v at %s", src, owners, at))
				if len(owners) > 1 {
					res.owners2++
				}
				// Above at one moment: at the start or at the end of the
				// sample (see connSample).
				start, end := one.start[src], one.end[src]
				if over(start) || over(end) {
					res.atOnce = append(res.atOnce, fmt.Sprintf("%s %v at its start, %v at its end, sample ending %s", src, start, end, at))
					if len(start) > 1 || len(end) > 1 {
						res.atOnceOwners2++
					}
				}
			}
			for i := 0; i < s.N; i++ {
				total := 0
				for _, n := range tally[ns+"/"+s.name(i)] {
					total += n
				}
				if total < s.Conns {
					res.below++
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
	}()
	time.Sleep(3 * time.Second) // the load before the change
	start := time.Now()
	change()
	why := ""
	for {
		if why = settled(); why == "" {
			break
		}
		if time.Since(start) > limit {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	res.took = time.Since(start)
	time.Sleep(3 * time.Second) // the load after it
	close(stop)
	<-sampled
	res.report = load.Stop()
	if why != "" {
		t.Fatalf("not settled %s after the change: %s (load: %s)", limit, why, res.report.Summary())
	}
	if res.samples == 0 {
		t.Fatalf("no sample of the warehouse side: %v", sampleErr)
	}
	res.handover = handovers(res.report)
	return res
}

// handovers finds, per source of the load, each change of the process that
// answered (by the answer's application_name) and the gap between the old
// one's last answer and the new one's first, keyed by the old one's shard.
func handovers(r fault.Report) map[string][]time.Duration {
	type answer struct {
		at    time.Time
		owner string
	}
	per := map[string][]answer{}
	for _, x := range r.Results {
		if x.Code != "" || x.Reconnect {
			continue
		}
		if _, _, owner, ok := appOwner(x.Answer); ok {
			per[x.Source] = append(per[x.Source], answer{x.End, owner})
		}
	}
	out := map[string][]time.Duration{}
	for _, as := range per {
		sort.Slice(as, func(i, j int) bool { return as[i].at.Before(as[j].at) })
		for i := 1; i < len(as); i++ {
			if as[i].owner != as[i-1].owner {
				shard, _, _ := strings.Cut(as[i-1].owner, "/")
				out[shard] = append(out[shard], as[i].at.Sub(as[i-1].at))
			}
		}
	}
	return out
}

// shardsSettled says what keeps the shard Deployments from all running
// `want` replicas of a template other than `before` (template hash per
// Deployment; nil = any), one each, available ("" when none).
func shardsSettled(t *testing.T, want int, before map[string]string) string {
	t.Helper()
	ds, err := client(t).AppsV1().Deployments(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=shard"})
	if err != nil {
		return err.Error()
	}
	if len(ds.Items) != want {
		return fmt.Sprintf("%d shard Deployments, want %d", len(ds.Items), want)
	}
	for i := range ds.Items {
		d := &ds.Items[i]
		if before != nil && d.Annotations["shardpool.dev/template-hash"] == before[d.Name] {
			return d.Name + " not updated yet"
		}
		if !deploymentSettled(d) {
			return d.Name + " rolling"
		}
	}
	return ""
}

// templateHashes: shard Deployment -> its template hash.
func templateHashes(t *testing.T) map[string]string {
	t.Helper()
	ds, err := client(t).AppsV1().Deployments(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=shard"})
	if err != nil {
		t.Fatal(err)
	}
	h := map[string]string{}
	for _, d := range ds.Items {
		h[d.Name] = d.Annotations["shardpool.dev/template-hash"]
	}
	return h
}

// durationStats: the largest and the median of ds.
func durationStats(ds []time.Duration) (worst, median time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)-1], s[len(s)/2]
}

// reportLoad writes what a change under load showed and fails the test
// on what must not happen.
func reportLoad(t *testing.T, r *reporter, res loadResult, s scaleSpec) {
	t.Helper()
	longest := res.report.Longest()
	r.say("  load: %s", res.report.Summary())
	r.say("  longest query: %.3f s (target under 2 s)", longest.End.Sub(longest.Start).Seconds())
	shards := slices.Sorted(maps.Keys(res.handover))
	for _, k := range shards {
		worst, median := durationStats(res.handover[k])
		r.say("  handover of shard %s's sources (old owner's last answer -> new owner's first): median %.3f s, longest %.3f s, %d sources", k, median.Seconds(), worst.Seconds(), len(res.handover[k]))
	}
	r.say("  warehouse side: %d samples; %d (source, sample) pairs above %d connections or with two owners (%d with two owners); %d below (being handed over)", res.samples, len(res.over), s.Conns, res.owners2, res.below)
	if s.Fronts {
		r.say("    of those, at one moment (the start or the end of a sample): %d (%d with two owners); the other %d only counting both the closed and the opened connections of a change made during the sample (a sample takes seconds here)",
			len(res.atOnce), res.atOnceOwners2, len(res.over)-len(res.atOnce))
		for _, a := range res.atOnce[:min(len(res.atOnce), 5)] {
			r.say("    e.g. %s", a)
		}
		r.say("  front listings no process of their owner holds (PgBouncer still listing a closed client: no client end, or its port reused by another process; left out above): at most %d in one sample", res.gone)
	}
	if n := len(res.report.Failed()); n > 0 {
		t.Errorf("%d queries failed: %v", n, res.report.Failed()[:min(n, 5)])
	}
	if len(res.over) > 0 {
		t.Errorf("sources over their connections or with two owners: %v", res.over[:min(len(res.over), 10)])
	}
}
