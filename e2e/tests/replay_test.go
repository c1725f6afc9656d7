package tests

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A transaction whose unanswered messages pass the router's replay bound
// (8 MiB) is told once, with a NOTICE, that it would not move with its
// source through a hand-over; the session carries on, the next transaction
// has its replay back, and a transaction under the bound hears nothing.
func TestReplayBoundIsAnnounced(t *testing.T) {
	ip, pw := installed(t)
	cfg, err := pgx.ParseConfig("host=" + ip + " port=5432 user=bi dbname=tenants.acme sslmode=disable connect_timeout=10")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = pw
	var mu sync.Mutex
	var notices []string
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		mu.Lock()
		defer mu.Unlock()
		notices = append(notices, n.Severity+" "+n.Code+" "+n.Message)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	big := strings.Repeat("x", 900*1024)
	// transaction sends n messages of 900 KiB each inside one transaction.
	transaction := func(n int) []string {
		t.Helper()
		mu.Lock()
		notices = nil
		mu.Unlock()
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < n; i++ {
			var l int
			if err := tx.QueryRow(ctx, "SELECT length($1::text)", big).Scan(&l); err != nil || l != len(big) {
				t.Fatalf("query %d: %v (length %d)", i, err, l)
			}
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), notices...)
	}
	if got := transaction(4); len(got) != 0 {
		t.Errorf("3.5 MiB in a transaction: notices %q, want none", got)
	}
	for round := 1; round <= 2; round++ {
		got := transaction(12)
		if len(got) != 1 || !strings.Contains(got[0], "01000") || !strings.Contains(got[0], "hands the source over") {
			t.Fatalf("round %d, 10.5 MiB in a transaction: notices %q, want exactly one about the replay bound", round, got)
		}
		t.Logf("round %d: %s", round, got[0])
	}
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("the session after: %v", err)
	}
}
