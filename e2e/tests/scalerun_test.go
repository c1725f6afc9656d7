package tests

// The machinery of the scale benchmark (bench/scale.sh runs
// TestScaleBench, build tag scalebench) and of its scaled-down check in
// `make test`: many DataSources created at once, their state followed by a
// watch, the server connections counted from the warehouse side (per
// application_name: PostgreSQL's pg_stat_activity, or the SHOW CLIENTS of
// the PgBouncer fronts that stand in for warehouses at a scale PostgreSQL
// cannot hold here), and the processes' memory, CPU and metrics sampled.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"shardpool.dev/e2e/fault"
)

var dataSourcesGVR = schema.GroupVersionResource{Group: "shardpool.dev", Version: "v1alpha1", Resource: "datasources"}

// scaleSpec is what one scale run creates.
type scaleSpec struct {
	// N sources, each with Conns warm connections (minIdle) and MaxSize.
	N, Conns, MaxSize int
	// Host and the ports of the warehouse: source i uses Ports[i % len].
	Host  string
	Ports []int
	// Fronts: the ports are PgBouncer fronts (count connections with SHOW
	// CLIENTS on their admin console, user admin / AdminPassword);
	// otherwise the ports are PostgreSQL itself (pg_stat_activity).
	Fronts        bool
	AdminPassword string
	// Database, user and password of every source.
	Database, User, Password string
}

func (s scaleSpec) name(i int) string {
	w := len(strconv.Itoa(s.N - 1))
	return fmt.Sprintf("src-%0*d", w, i)
}

// srcState is what the watch keeps of one DataSource.
type srcState struct {
	gen, observed int64
	shard         string
	phase         string
	servedBy      string
	open          int64
	// among: the shard count of the operator's last pass over it.
	among int64
	// lastError as written.
	lastError string
	// writer: the field manager of the newest managedFields entry.
	writer string
}

// changeOf names what a write changed between two states of a source, and
// who wrote it, e.g. "shardpool-shard: phase Ready->Connecting".
func changeOf(prev, next srcState) string {
	var parts []string
	if prev.phase != next.phase {
		parts = append(parts, "phase "+prev.phase+"->"+next.phase)
	}
	if prev.shard != next.shard {
		parts = append(parts, "shard")
	}
	if prev.servedBy != next.servedBy {
		parts = append(parts, "servedBy")
	}
	if prev.among != next.among {
		parts = append(parts, fmt.Sprintf("assignedAmong %d->%d", prev.among, next.among))
	}
	if prev.gen != next.gen {
		parts = append(parts, "generation")
	}
	if prev.observed != next.observed {
		parts = append(parts, "observedGeneration")
	}
	if prev.lastError != next.lastError {
		e := next.lastError
		if len(e) > 60 {
			e = e[:60]
		}
		parts = append(parts, fmt.Sprintf("lastError %q", e))
	}
	if prev.open != next.open {
		parts = append(parts, "connections")
	}
	if len(parts) == 0 {
		parts = append(parts, "other fields")
	}
	return next.writer + ": " + strings.Join(parts, ", ")
}

// newestManager is the field manager of the most recent managedFields entry.
func newestManager(u *unstructured.Unstructured) string {
	var who string
	var at time.Time
	for _, m := range u.GetManagedFields() {
		if m.Time != nil && !m.Time.Time.Before(at) {
			at, who = m.Time.Time, m.Manager
		}
	}
	return who
}

// sourceWatch follows every DataSource of a namespace.
type sourceWatch struct {
	stop chan struct{}
	// mu guards m, moves and writes.
	mu sync.Mutex
	m  map[string]srcState
	// moves counts, per source, the times status.shard changed from one
	// shard to another.
	moves map[string]int
	// writes counts the changes to DataSources seen (spec or status).
	writes int
	// kinds counts the writes by what they changed and who wrote them
	// (changeOf).
	kinds map[string]int
}

// kindsSnapshot copies the writes counted by kind.
func (w *sourceWatch) kindsSnapshot() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.kinds)
}

func (w *sourceWatch) writeCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writes
}

func nested(o map[string]any, path ...string) any {
	v, _, _ := unstructured.NestedFieldNoCopy(o, path...)
	return v
}

func asInt(v any) int64 {
	switch x := v.(type) {
	case int64:
		return x
	case float64:
		return int64(x)
	case int32:
		return int64(x)
	case int:
		return int64(x)
	}
	return 0
}

func stateOf(u *unstructured.Unstructured) srcState {
	o := u.Object
	s := srcState{gen: u.GetGeneration(), observed: asInt(nested(o, "status", "observedGeneration"))}
	if v := nested(o, "status", "shard"); v != nil {
		s.shard = strconv.FormatInt(asInt(v), 10)
	}
	s.phase, _ = nested(o, "status", "phase").(string)
	s.servedBy, _ = nested(o, "status", "servedBy").(string)
	s.open = asInt(nested(o, "status", "connections", "open"))
	s.among = asInt(nested(o, "status", "assignedAmong"))
	s.lastError, _ = nested(o, "status", "lastError").(string)
	s.writer = newestManager(u)
	return s
}

func watchSources(t *testing.T, ns string) *sourceWatch {
	t.Helper()
	dc, err := dynamic.NewForConfig(restConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	w := &sourceWatch{stop: make(chan struct{}), m: map[string]srcState{}, moves: map[string]int{}, kinds: map[string]int{}}
	f := dynamicinformer.NewFilteredDynamicSharedInformerFactory(dc, 0, ns, nil)
	inf := f.ForResource(dataSourcesGVR).Informer()
	put := func(obj any) {
		if u, ok := obj.(*unstructured.Unstructured); ok {
			st := stateOf(u)
			w.mu.Lock()
			if prev, ok := w.m[u.GetName()]; ok && prev.shard != "" && st.shard != "" && prev.shard != st.shard {
				w.moves[u.GetName()]++
			}
			w.m[u.GetName()] = st
			w.mu.Unlock()
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: put,
		UpdateFunc: func(o, n any) {
			if ou, ok := o.(*unstructured.Unstructured); ok {
				if nu, ok := n.(*unstructured.Unstructured); ok && ou.GetResourceVersion() != nu.GetResourceVersion() {
					w.mu.Lock()
					w.writes++
					w.kinds[changeOf(stateOf(ou), stateOf(nu))]++
					w.mu.Unlock()
				}
			}
			put(n)
		},
		DeleteFunc: func(obj any) {
			if u, ok := obj.(*unstructured.Unstructured); ok {
				w.mu.Lock()
				delete(w.m, u.GetName())
				w.mu.Unlock()
			}
		},
	}); err != nil {
		t.Fatal(err)
	}
	f.Start(w.stop)
	if !cache.WaitForCacheSync(w.stop, inf.HasSynced) {
		t.Fatal("DataSource watch did not sync")
	}
	t.Cleanup(func() { close(w.stop) })
	return w
}

// counts: sources with a shard; Ready for their generation with at least
// `conns` open.
func (w *sourceWatch) counts(conns int64) (assigned, ready int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.m {
		if s.shard != "" {
			assigned++
		}
		if s.phase == "Ready" && s.observed == s.gen && s.open >= conns {
			ready++
		}
	}
	return
}

func (w *sourceWatch) snapshot() map[string]srcState {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.m)
}

// movesSnapshot copies the per-source move counts.
func (w *sourceWatch) movesSnapshot() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.moves)
}

// createSources creates the Secret and the N DataSources of `s` in ns with
// `workers` requests in flight.
func createSources(t *testing.T, ns string, s scaleSpec, workers int) {
	t.Helper()
	ctx := context.Background()
	c := client(t)
	if _, err := c.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "warehouse"},
		StringData: map[string]string{"password": s.Password},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// As a deploy tool would: no client-side rate limit; the API server's
	// own flow control decides.
	cfg := restConfig(t)
	cfg.QPS, cfg.Burst = 10000, 10000
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	api := dc.Resource(dataSourcesGVR).Namespace(ns)
	next := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				u := &unstructured.Unstructured{Object: map[string]any{
					"apiVersion": "shardpool.dev/v1alpha1",
					"kind":       "DataSource",
					"metadata":   map[string]any{"name": s.name(i), "namespace": ns},
					"spec": map[string]any{
						"host":              s.Host,
						"port":              int64(s.Ports[i%len(s.Ports)]),
						"database":          s.Database,
						"user":              s.User,
						"passwordSecretRef": map[string]any{"name": "warehouse", "key": "password"},
						"tls":               map[string]any{"mode": "disable"},
						"pool":              map[string]any{"minIdle": int64(s.Conns), "maxSize": int64(s.MaxSize)},
					},
				}}
				if _, err := api.Create(ctx, u, metav1.CreateOptions{}); err != nil {
					select {
					case errs <- fmt.Errorf("%s: %w", s.name(i), err):
					default:
					}
				}
			}
		}()
	}
	for i := 0; i < s.N; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatalf("creating DataSources: %v", err)
	default:
	}
}

// connTally is, per source (<ns>/<name>), the server connections seen on
// the warehouse side per owning process (<shard>/<token>).
type connTally map[string]map[string]int

// sampleConns counts the warehouse-side connections of every source in ns.
func sampleConns(ctx context.Context, s scaleSpec, ns string) (connTally, error) {
	apps, err := warehouseApps(ctx, s, ns)
	if err != nil {
		return nil, err
	}
	tally := connTally{}
	for _, app := range apps {
		src, _, owner, ok := appOwner(app)
		if !ok {
			continue
		}
		if tally[src] == nil {
			tally[src] = map[string]int{}
		}
		tally[src][owner]++
	}
	return tally, nil
}

// warehouseApps lists the application_name of every connection of a
// source of ns that the warehouse side holds.
func warehouseApps(ctx context.Context, s scaleSpec, ns string) ([]string, error) {
	prefix := "shardpool/" + ns + "/"
	if !s.Fronts {
		conn, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=postgres sslmode=disable",
			os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER"), os.Getenv("WAREHOUSE_PGPASSWORD")))
		if err != nil {
			return nil, err
		}
		defer conn.Close(ctx)
		rows, err := conn.Query(ctx, "SELECT application_name FROM pg_stat_activity WHERE starts_with(application_name, $1)", prefix)
		if err != nil {
			return nil, err
		}
		return pgx.CollectRows(rows, pgx.RowTo[string])
	}
	var out []string
	for _, port := range s.Ports {
		apps, err := frontApps(ctx, s, port)
		if err != nil {
			return nil, fmt.Errorf("front :%d: %w", port, err)
		}
		for _, a := range apps {
			if strings.HasPrefix(a, prefix) {
				out = append(out, a)
			}
		}
	}
	return out, nil
}

// frontApps reads SHOW CLIENTS of the PgBouncer on `port`: the
// application_name of each client connection to the source database.
func frontApps(ctx context.Context, s scaleSpec, port int) ([]string, error) {
	conn, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=%d user=admin password=%s dbname=pgbouncer sslmode=disable default_query_exec_mode=simple_protocol",
		s.Host, port, s.AdminPassword))
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SHOW CLIENTS")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	app, db := -1, -1
	for i, f := range rows.FieldDescriptions() {
		switch f.Name {
		case "application_name":
			app = i
		case "database":
			db = i
		}
	}
	if app < 0 || db < 0 {
		return nil, fmt.Errorf("SHOW CLIENTS has no application_name or database column")
	}
	var out []string
	for rows.Next() {
		v := rows.RawValues()
		if string(v[db]) == s.Database {
			out = append(out, string(v[app]))
		}
	}
	return out, rows.Err()
}

// checkTally says what is wrong with `tally` against the watch's state:
// every source exactly `conns` connections, one owner, of its own shard.
func checkTally(tally connTally, states map[string]srcState, ns string, conns int) []string {
	var bad []string
	for name, st := range states {
		owners := tally[ns+"/"+name]
		total := 0
		for owner, n := range owners {
			total += n
			if shard, _, _ := strings.Cut(owner, "/"); shard != st.shard {
				bad = append(bad, fmt.Sprintf("%s: %d connections from shard %s, assigned to %q", name, n, shard, st.shard))
			}
		}
		if len(owners) > 1 {
			bad = append(bad, fmt.Sprintf("%s: %d owners %v", name, len(owners), owners))
		}
		if total != conns {
			bad = append(bad, fmt.Sprintf("%s: %d connections, want %d", name, total, conns))
		}
	}
	sort.Strings(bad)
	return bad
}

// procOf is a role's running pods: name -> (IP, pid).
type procInfo struct {
	ip  string
	pid int
}

func procsOf(t *testing.T, component string) map[string]procInfo {
	t.Helper()
	pods, err := client(t).CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + component})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]procInfo{}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning {
			continue
		}
		out[p.Name] = procInfo{ip: p.Status.PodIP, pid: containerPid(p)}
	}
	return out
}

// cpuSeconds is a process's user + system CPU time.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	k, _ := strconv.ParseFloat(f[12], 64)
	return (u + k) / 100 // USER_HZ
}

// metricLines fetches http://ip:9090/metrics and returns the lines of the
// series whose name starts with one of `prefixes`.
func metricLines(ip string, prefixes ...string) ([]string, error) {
	hc := http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + ip + ":9090/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return filterLines(resp.Body, prefixes...)
}

func filterLines(r io.Reader, prefixes ...string) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<16), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") {
			continue
		}
		for _, p := range prefixes {
			if strings.HasPrefix(l, p) {
				out = append(out, l)
				break
			}
		}
	}
	return out, sc.Err()
}

// metricSum sums the samples of the series named exactly `name`.
func metricSum(lines []string, name string) float64 {
	sum := 0.0
	for _, l := range lines {
		n := l
		if i := strings.IndexAny(l, "{ "); i >= 0 {
			n = l[:i]
		}
		if n != name {
			continue
		}
		f := sampleFields(l)
		if len(f) == 0 {
			continue
		}
		if v, err := strconv.ParseFloat(f[0], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// sampleFields are the fields after a series line's name and labels: the
// value, then the timestamp when there is one.
func sampleFields(line string) []string {
	if i := strings.LastIndexByte(line, '}'); i >= 0 {
		return strings.Fields(line[i+1:])
	}
	f := strings.Fields(line)
	if len(f) == 0 {
		return nil
	}
	return f[1:]
}

// labelOf reads label `key` of a series line.
func labelOf(line, key string) string {
	i := strings.Index(line, key+"=\"")
	if i < 0 {
		return ""
	}
	rest := line[i+len(key)+2:]
	j := strings.IndexByte(rest, '"')
	if j < 0 {
		return ""
	}
	return rest[:j]
}

// apiWrites reads the API server's apiserver_request_total: write requests
// (every verb but GET, LIST and WATCH) per resource[/subresource].
func apiWrites(t *testing.T) map[string]float64 {
	t.Helper()
	raw, err := client(t).CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(context.Background())
	if err != nil {
		t.Fatalf("API server metrics: %v", err)
	}
	lines, err := filterLines(strings.NewReader(string(raw)), "apiserver_request_total{")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, l := range lines {
		switch labelOf(l, "verb") {
		case "GET", "LIST", "WATCH", "CONNECT":
			continue
		}
		res := labelOf(l, "resource")
		if sub := labelOf(l, "subresource"); sub != "" {
			res += "/" + sub
		}
		if code := labelOf(l, "code"); !strings.HasPrefix(code, "2") {
			res += " (refused, " + code + ")"
		}
		f := sampleFields(l)
		if len(f) == 0 {
			continue
		}
		v, _ := strconv.ParseFloat(f[0], 64)
		out[res] += v
	}
	return out
}

// histogram is a Prometheus histogram's cumulative buckets (le -> count).
type histogram map[float64]float64

func readHistogram(lines []string, name string) histogram {
	h := histogram{}
	for _, l := range lines {
		if !strings.HasPrefix(l, name+"_bucket{") {
			continue
		}
		le := labelOf(l, "le")
		b := math.Inf(1)
		if le != "+Inf" {
			b, _ = strconv.ParseFloat(le, 64)
		}
		f := sampleFields(l)
		if len(f) == 0 {
			continue
		}
		v, _ := strconv.ParseFloat(f[0], 64)
		h[b] += v
	}
	return h
}

// quantile of the observations between two readings of a histogram (the
// upper bound of the bucket that holds it); NaN without observations.
func quantile(before, after histogram, q float64) float64 {
	var les []float64
	for le := range after {
		les = append(les, le)
	}
	sort.Float64s(les)
	if len(les) == 0 {
		return math.NaN()
	}
	total := after[les[len(les)-1]] - before[les[len(les)-1]]
	if total <= 0 {
		return math.NaN()
	}
	for _, le := range les {
		if after[le]-before[le] >= q*total {
			return le
		}
	}
	return math.Inf(1)
}

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
	// below counts (source, sample) pairs under the source's connections:
	// sources being handed over at that moment.
	below int
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
			tally, err := sampleConns(ctx, s, ns)
			cancel()
			if err != nil {
				sampleErr = err
				time.Sleep(time.Second)
				continue
			}
			res.samples++
			for src, owners := range tally {
				total := 0
				for _, n := range owners {
					total += n
				}
				if len(owners) > 1 || total > s.Conns {
					res.over = append(res.over, fmt.Sprintf("%s %v at %s", src, owners, time.Now().Format("15:04:05.000")))
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
	r.say("  warehouse side: %d samples; %d (source, sample) pairs above %d connections or with two owners; %d below (being handed over)", res.samples, len(res.over), s.Conns, res.below)
	if n := len(res.report.Failed()); n > 0 {
		t.Errorf("%d queries failed: %v", n, res.report.Failed()[:min(n, 5)])
	}
	if len(res.over) > 0 {
		t.Errorf("sources over their connections or with two owners: %v", res.over[:min(len(res.over), 10)])
	}
}

// notAmong counts the sources the operator has not yet placed among
// `shards` shards.
func (w *sourceWatch) notAmong(shards int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, s := range w.m {
		if s.among != int64(shards) {
			n++
		}
	}
	return n
}
