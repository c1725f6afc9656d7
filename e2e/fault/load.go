package fault

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Load is steady query traffic through the router, as a BI backend makes
// it: several clients per source, each with its own connection, each
// reconnecting after an error (a pool that replaces a broken connection).
type Load struct {
	// Connect opens a client connection to a source (`<ns>.<name>`).
	Connect func(ctx context.Context, db string) (*pgx.Conn, error)
	// Query is what every client runs, again and again.
	Query string
	// Pause between a client's queries.
	Pause time.Duration
	// Timeout bounds one query (a query still running then counts as hung).
	Timeout time.Duration
	// KeepAnswers keeps each answer's text in its Result (a query that
	// says who answered it, such as the server connection's
	// application_name).
	KeepAnswers bool
	// RetryRestarting makes every client a pool that, when a query fails
	// with SQLSTATE 57P01 (the server or router closed the connection at
	// an idle point, as a restarting router does), reconnects and runs the
	// query once more; only a failed retry counts as a failure. Any other
	// error counts at once.
	RetryRestarting bool

	stop chan struct{}
	wg   sync.WaitGroup
	// mu guards everything below.
	mu      sync.Mutex
	results []Result
	started time.Time
}

// Result is one query (or one failed reconnect).
type Result struct {
	// Source is `<ns>.<name>`.
	Source string
	// Start and End of the attempt.
	Start, End time.Time
	// Code is the SQLSTATE of a failure ("" on success; "connect" for a
	// reconnect that failed without one, "client" for a client-side
	// timeout or network error).
	Code string
	// Err is the failure's text.
	Err string
	// Reconnect is set for a failed attempt to open a connection.
	Reconnect bool
	// Answer is the text of the query's one value (with KeepAnswers).
	Answer string
	// Retried is set when the query was run again on a new connection
	// after a 57P01 (with RetryRestarting); RetryErr is that first error.
	Retried  bool
	RetryErr string
}

// Start runs `clients` clients on each source until Stop.
func (l *Load) Start(sources []string, clients int) {
	l.stop = make(chan struct{})
	l.started = time.Now()
	if l.Query == "" {
		l.Query = "SELECT 1"
	}
	if l.Timeout == 0 {
		l.Timeout = 30 * time.Second
	}
	for _, src := range sources {
		for i := 0; i < clients; i++ {
			l.wg.Add(1)
			go l.client(src)
		}
	}
}

func code(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func (l *Load) record(r Result) {
	l.mu.Lock()
	l.results = append(l.results, r)
	l.mu.Unlock()
}

func (l *Load) client(src string) {
	defer l.wg.Done()
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			_ = conn.Close(context.Background())
		}
	}()
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		if conn == nil {
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), l.Timeout)
			c, err := l.Connect(ctx, src)
			cancel()
			if err != nil {
				cd := code(err)
				if cd == "" {
					cd = "connect"
				}
				l.record(Result{Source: src, Start: start, End: time.Now(), Code: cd, Err: err.Error(), Reconnect: true})
				time.Sleep(100 * time.Millisecond)
				continue
			}
			conn = c
		}
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), l.Timeout)
		var answer any
		err := conn.QueryRow(ctx, l.Query).Scan(&answer)
		cancel()
		r := Result{Source: src, Start: start}
		if err != nil && l.RetryRestarting && code(err) == "57P01" {
			// The pool's one retry, on a new connection.
			r.Retried, r.RetryErr = true, err.Error()
			_ = conn.Close(context.Background())
			ctx, cancel := context.WithTimeout(context.Background(), l.Timeout)
			conn, err = l.Connect(ctx, src)
			if err == nil {
				err = conn.QueryRow(ctx, l.Query).Scan(&answer)
			}
			cancel()
		}
		r.End = time.Now()
		if err == nil && l.KeepAnswers {
			r.Answer = fmt.Sprint(answer)
		}
		if err != nil {
			r.Code, r.Err = code(err), err.Error()
			if r.Code == "" {
				r.Code = "client"
			}
			// A BI backend's pool drops the connection and opens another.
			if conn != nil {
				_ = conn.Close(context.Background())
			}
			conn = nil
		}
		l.record(r)
		if l.Pause > 0 {
			time.Sleep(l.Pause)
		}
	}
}

// Stop ends the load and returns every result.
func (l *Load) Stop() Report {
	close(l.stop)
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return Report{Results: append([]Result(nil), l.results...), Started: l.started, Ended: time.Now()}
}

// Report is what a load saw.
type Report struct {
	Results        []Result
	Started, Ended time.Time
}

// Queries counts the queries run (reconnect attempts not included).
func (r Report) Queries() int {
	n := 0
	for _, x := range r.Results {
		if !x.Reconnect {
			n++
		}
	}
	return n
}

// Failed returns the failed attempts (queries and reconnects).
func (r Report) Failed() []Result {
	var out []Result
	for _, x := range r.Results {
		if x.Code != "" {
			out = append(out, x)
		}
	}
	return out
}

// Retries returns the queries run again after a 57P01 (RetryRestarting),
// whether or not the retry succeeded.
func (r Report) Retries() []Result {
	var out []Result
	for _, x := range r.Results {
		if x.Retried {
			out = append(out, x)
		}
	}
	return out
}

// Codes counts failures by SQLSTATE.
func (r Report) Codes() map[string]int {
	m := map[string]int{}
	for _, x := range r.Failed() {
		m[x.Code]++
	}
	return m
}

// Longest is the longest single attempt.
func (r Report) Longest() Result {
	var worst Result
	for _, x := range r.Results {
		if x.End.Sub(x.Start) > worst.End.Sub(worst.Start) {
			worst = x
		}
	}
	return worst
}

// answers returns, per source, the sorted times of successful answers.
func (r Report) answers() map[string][]time.Time {
	m := map[string][]time.Time{}
	for _, x := range r.Results {
		if x.Code == "" && !x.Reconnect {
			m[x.Source] = append(m[x.Source], x.End)
		}
	}
	for _, ts := range m {
		sort.Slice(ts, func(i, j int) bool { return ts[i].Before(ts[j]) })
	}
	return m
}

// LongestSilence is, over all sources, the longest stretch between two
// answers (or between the load's start and the first answer, or the last
// answer and the load's end) of one source, and that source.
func (r Report) LongestSilence() (time.Duration, string) {
	var worst time.Duration
	var which string
	for src, ts := range r.answers() {
		prev := r.Started
		for _, t := range append(ts, r.Ended) {
			if d := t.Sub(prev); d > worst {
				worst, which = d, src
			}
			prev = t
		}
	}
	return worst, which
}

// FirstAnswerAfter is, per source, the time from `t` to its first answer
// to a query sent after `t` (absent: none).
func (r Report) FirstAnswerAfter(t time.Time) map[string]time.Duration {
	m := map[string]time.Duration{}
	for _, x := range r.Results {
		if x.Code != "" || x.Reconnect || x.Start.Before(t) {
			continue
		}
		if d, ok := m[x.Source]; !ok || x.End.Sub(t) < d {
			m[x.Source] = x.End.Sub(t)
		}
	}
	return m
}

// Summary is one line of figures.
func (r Report) Summary() string {
	silence, src := r.LongestSilence()
	longest := r.Longest()
	failed := fmt.Sprintf("%d failed", len(r.Failed()))
	if codes := r.Codes(); len(codes) > 0 {
		var parts []string
		for code, n := range codes {
			parts = append(parts, fmt.Sprintf("%s: %d", code, n))
		}
		sort.Strings(parts)
		failed += " (" + strings.Join(parts, ", ") + ")"
	}
	if n := len(r.Retries()); n > 0 {
		failed += fmt.Sprintf(", %d retried once after 57P01", n)
	}
	return fmt.Sprintf("%d queries, %s, longest query %s, longest stretch without an answer %s (%s)",
		r.Queries(), failed, longest.End.Sub(longest.Start).Round(time.Millisecond), silence.Round(time.Millisecond), src)
}
