package fault

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Owners samples the warehouse's pg_stat_activity every Interval and
// records every sample in which one source has server connections from
// two shard processes (application_name shardpool/<ns>/<name>/<shard>/<token>):
// the one thing that must never happen.
type Owners struct {
	// Interval between samples (50 ms by default).
	Interval time.Duration
	// Prefix limits the sampled sources (e.g. "shardpool/faults-").
	Prefix string

	stop chan struct{}
	done chan struct{}
	// mu guards everything below.
	mu      sync.Mutex
	samples int
	// failed counts sampling attempts that failed (the warehouse down or
	// restarting); gap is the longest time between two good samples.
	failed     int
	gap        time.Duration
	lastOK     time.Time
	violations []string
	most       map[string]int
	// last is when each (source, owner) was last seen, keyed "src owner".
	last map[string]time.Time
	err  error
}

// SplitApp splits an application_name into its source (<ns>/<name>) and
// owning process (<shard>/<token>); ok is false for other names.
func SplitApp(app string) (source, owner string, ok bool) {
	parts := strings.Split(app, "/")
	if len(parts) != 5 || parts[0] != "shardpool" {
		return "", "", false
	}
	return parts[1] + "/" + parts[2], parts[3] + "/" + parts[4], true
}

// Start samples through connections from connect (direct to the
// warehouse, as a role that sees every backend) until Stop. A failed sample
// drops its connection and the next one opens another, so sampling goes on
// across a warehouse restart.
func (o *Owners) Start(connect func(context.Context) (*pgx.Conn, error)) {
	if o.Interval == 0 {
		o.Interval = 50 * time.Millisecond
	}
	o.stop, o.done = make(chan struct{}), make(chan struct{})
	o.most = map[string]int{}
	o.last = map[string]time.Time{}
	go func() {
		defer close(o.done)
		tick := time.NewTicker(o.Interval)
		defer tick.Stop()
		var conn *pgx.Conn
		defer func() {
			if conn != nil {
				_ = conn.Close(context.Background())
			}
		}()
		for {
			select {
			case <-o.stop:
				return
			case <-tick.C:
			}
			var err error
			if conn == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				conn, err = connect(ctx)
				cancel()
			}
			if err == nil {
				err = o.sample(conn)
			}
			o.mu.Lock()
			if err != nil {
				o.failed++
				o.err = err
			} else {
				now := time.Now()
				if !o.lastOK.IsZero() && now.Sub(o.lastOK) > o.gap {
					o.gap = now.Sub(o.lastOK)
				}
				o.lastOK, o.err = now, nil
			}
			o.mu.Unlock()
			if err != nil && conn != nil {
				_ = conn.Close(context.Background())
				conn = nil
			}
		}
	}()
}

func (o *Owners) sample(conn *pgx.Conn) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := conn.Query(ctx, "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE $1", o.Prefix+"%")
	if err != nil {
		return err
	}
	owners := map[string]map[string]bool{}
	conns := map[string]int{}
	for rows.Next() {
		var app string
		if err := rows.Scan(&app); err != nil {
			rows.Close()
			return err
		}
		src, owner, ok := SplitApp(app)
		if !ok {
			continue
		}
		if owners[src] == nil {
			owners[src] = map[string]bool{}
		}
		owners[src][owner] = true
		conns[src]++
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	at := time.Now()
	now := at.Format("15:04:05.000")
	o.mu.Lock()
	defer o.mu.Unlock()
	o.samples++
	for src, set := range owners {
		for owner := range set {
			o.last[src+" "+owner] = at
		}
		if len(set) > 1 {
			var list []string
			for k := range set {
				list = append(list, k)
			}
			sort.Strings(list)
			o.violations = append(o.violations, fmt.Sprintf("%s %s held by %v", now, src, list))
		}
		if conns[src] > o.most[src] {
			o.most[src] = conns[src]
		}
	}
	return nil
}

// Owning returns the owners (<shard>/<token>) of a source's connections
// in the latest sample that had any.
func (o *Owners) Owning(src string) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var latest time.Time
	var out []string
	for k, t := range o.last {
		s, owner, _ := strings.Cut(k, " ")
		if s != src {
			continue
		}
		switch {
		case t.After(latest):
			latest, out = t, []string{owner}
		case t.Equal(latest):
			out = append(out, owner)
		}
	}
	sort.Strings(out)
	return out
}

// LastSeen is when a sample last showed a connection of `owner` for `src`.
func (o *Owners) LastSeen(src, owner string) time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.last[src+" "+owner]
}

// Sampled is what Stop reports.
type Sampled struct {
	// Samples taken, and attempts that failed.
	Samples, Failed int
	// Gap is the longest time between two good samples.
	Gap time.Duration
	// Violations lists the samples with a source held by two processes.
	Violations []string
	// Most is the most connections seen per source.
	Most map[string]int
	// Err is the error of the last attempt, nil when it succeeded.
	Err error
}

// Stop ends sampling and reports what was seen.
func (o *Owners) Stop() Sampled {
	close(o.stop)
	<-o.done
	o.mu.Lock()
	defer o.mu.Unlock()
	return Sampled{o.samples, o.failed, o.gap, o.violations, o.most, o.err}
}

// Backends lists the backend pids of every server connection of sources
// whose application_name starts with prefix, per source, sorted.
func Backends(ctx context.Context, conn *pgx.Conn, prefix string) (map[string][]int, error) {
	rows, err := conn.Query(ctx, "SELECT application_name, pid FROM pg_stat_activity WHERE application_name LIKE $1", prefix+"%")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	m := map[string][]int{}
	for rows.Next() {
		var app string
		var pid int
		if err := rows.Scan(&app, &pid); err != nil {
			return nil, err
		}
		if src, _, ok := SplitApp(app); ok {
			m[src] = append(m[src], pid)
		}
	}
	for _, pids := range m {
		sort.Ints(pids)
	}
	return m, rows.Err()
}
