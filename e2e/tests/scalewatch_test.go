package tests

// The scale runs' view of the DataSources: created many at once, then
// followed by one watch that keeps, per source, the fields a run measures
// (assignment, phase, connections, moves) and counts every write after the
// sources settled, by what changed and which field manager wrote it.

import (
	"context"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
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
	ns   string
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
	w := &sourceWatch{stop: make(chan struct{}), ns: ns, m: map[string]srcState{}, moves: map[string]int{}, kinds: map[string]int{}}
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

// notAmong counts the sources the operator has not yet placed among
// `shards` shards (where that count matters: see placedAmong).
func (w *sourceWatch) notAmong(shards int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for name, s := range w.m {
		if !placedAmong(w.ns+"/"+name, int(s.among), shards) {
			n++
		}
	}
	return n
}
