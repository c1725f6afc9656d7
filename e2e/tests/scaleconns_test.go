package tests

// Server connections counted from the warehouse side, per application_name:
// PostgreSQL's pg_stat_activity, or SHOW CLIENTS of the PgBouncer fronts
// that stand in for warehouses at a scale PostgreSQL cannot hold here.

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// connTally is, per source (<ns>/<name>), the server connections seen on
// the warehouse side per owning process (<shard>/<token>).
type connTally map[string]map[string]int

func (t connTally) add(src, owner string) {
	if t[src] == nil {
		t[src] = map[string]int{}
	}
	t[src][owner]++
}

// connSample is one look at the warehouse side. With fronts a look takes
// seconds (the kernel's socket table is read before and after the
// listings), and a connection closed or opened meanwhile is seen too:
// `all` counts every connection held at some moment of the sample, `start`
// those held when it began (the first read of the socket table), `end`
// those held when it ended (the last read). A pool that replaces one
// connection during the sample is 13 in `all` but 12 at its start and at
// its end; a pool that really held 13 at once is 13 in one of them, unless
// the 13th both opened and closed within the sample. pg_stat_activity is
// one snapshot: all three are the same.
type connSample struct {
	all, start, end connTally
	// gone counts listings of the fronts with no client end left (see
	// frontListings): not connections any process holds, not counted.
	gone int
}

// sampleConns counts the warehouse-side connections of every source in ns.
// With fronts it also returns how many client listings of the fronts have
// no client end left (see frontListings): not connections any process holds,
// so not in the tally.
func sampleConns(ctx context.Context, s scaleSpec, ns string) (connTally, int, error) {
	one, err := sampleSpan(ctx, s, ns)
	return one.all, one.gone, err
}

// sampleSpan is sampleConns, telling the connections held at the start and
// at the end of the sample apart (see connSample).
func sampleSpan(ctx context.Context, s scaleSpec, ns string) (connSample, error) {
	held, dead, err := warehouseApps(ctx, s, ns)
	if err != nil {
		return connSample{}, err
	}
	out := connSample{all: connTally{}, start: connTally{}, end: connTally{}, gone: dead}
	for _, l := range held {
		src, _, owner, ok := appOwner(l.app)
		if !ok {
			continue
		}
		out.all.add(src, owner)
		if l.early {
			out.start.add(src, owner)
		}
		if l.late {
			out.end.add(src, owner)
		}
	}
	return out, nil
}

// warehouseApps lists every connection of a source of ns that the
// warehouse side holds (its application_name, and whether it was held at
// the start and at the end of the sample), and (fronts only) how many
// listings had no client end.
func warehouseApps(ctx context.Context, s scaleSpec, ns string) ([]listing, int, error) {
	prefix := "shardpool/" + ns + "/"
	if !s.Fronts {
		conn, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=postgres sslmode=disable",
			os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER"), os.Getenv("WAREHOUSE_PGPASSWORD")))
		if err != nil {
			return nil, 0, err
		}
		defer conn.Close(ctx)
		rows, err := conn.Query(ctx, "SELECT application_name FROM pg_stat_activity WHERE starts_with(application_name, $1)", prefix)
		if err != nil {
			return nil, 0, err
		}
		apps, err := pgx.CollectRows(rows, pgx.RowTo[string])
		held := make([]listing, 0, len(apps))
		for _, app := range apps {
			held = append(held, listing{app: app, early: true, late: true})
		}
		return held, 0, err
	}
	// The kernel's client ends before and after the listings of every
	// front: a listed connection that was open at any moment of them is in
	// one of the two reads (open before, or opened meanwhile and still open
	// after). One read of /proc/net/tcp each for all fronts: at 150,000
	// sockets a read takes about a second, and a read per front made a
	// sample outlast its 20 s.
	before, err := clientEnds()
	if err != nil {
		return nil, 0, err
	}
	var listed []listing
	for _, port := range s.Ports {
		l, err := frontListings(ctx, s, port)
		if err != nil {
			return nil, 0, fmt.Errorf("front :%d: %w", port, err)
		}
		for _, one := range l {
			if strings.HasPrefix(one.app, prefix) {
				listed = append(listed, one)
			}
		}
	}
	after, err := clientEnds()
	if err != nil {
		return nil, 0, err
	}
	var held, missing []listing
	for _, l := range listed {
		end := [2]int{l.port, l.front}
		l.early, l.late = before[end] != 0, after[end] != 0
		if ino := max(after[end], before[end]); ino != 0 {
			l.inode = ino
			held = append(held, l)
		} else {
			missing = append(missing, l)
		}
	}
	// /proc/net/tcp is read in pieces while sockets come and go, and a
	// read can skip an entry (a full run counted 71,993 of 72,000 live
	// connections at rest with two reads): a listing counts as gone only
	// when three more reads do not find its client end either.
	for i := 0; i < 3 && len(missing) > 0; i++ {
		again, err := clientEnds()
		if err != nil {
			return nil, 0, err
		}
		still := missing[:0]
		for _, l := range missing {
			if ino := again[[2]int{l.port, l.front}]; ino != 0 {
				// Held after the sample: at its end (a skipped entry of
				// the first reads, or opened during the sample).
				l.inode, l.late = ino, true
				held = append(held, l)
			} else {
				still = append(still, l)
			}
		}
		missing = still
	}
	out, reused, err := byTheirOwners(held)
	if err != nil {
		return nil, 0, err
	}
	return out, len(missing) + reused, nil
}

// byTheirOwners keeps the listings whose client socket the process that
// wrote their application_name holds. A dead listing's client port can be
// taken again by a later connection of another process to the same front,
// which makes the dead listing look held: such a listing names one shard
// process (its token) while the socket belongs to another. Each socket's
// process comes from /proc/<pid>/fd; a process's token is the one most of
// its sockets' listings carry. Returns the applications kept and how many
// listings were dropped as reused ports.
func byTheirOwners(held []listing) ([]listing, int, error) {
	owner, err := socketOwners()
	if err != nil {
		return nil, 0, err
	}
	tokens := map[int]map[string]int{}
	for _, l := range held {
		pid := owner[l.inode]
		_, _, tok, ok := appOwner(l.app)
		if pid == 0 || !ok {
			continue
		}
		if tokens[pid] == nil {
			tokens[pid] = map[string]int{}
		}
		tokens[pid][tok]++
	}
	mainToken := map[int]string{}
	for pid, counts := range tokens {
		best := 0
		for tok, n := range counts {
			if n > best {
				best, mainToken[pid] = n, tok
			}
		}
	}
	var out []listing
	reused := 0
	for _, l := range held {
		pid := owner[l.inode]
		_, _, tok, ok := appOwner(l.app)
		if pid != 0 && ok && tok != mainToken[pid] {
			reused++
			continue
		}
		out = append(out, l)
	}
	return out, reused, nil
}

// socketOwners maps socket inodes to the shardpool process holding them,
// from the /proc/<pid>/fd links of every process named shardpool.
func socketOwners() (map[uint64]int, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	owners := map[uint64]int{}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || strings.TrimSpace(string(comm)) != "shardpool" {
			continue
		}
		dir := fmt.Sprintf("/proc/%d/fd", pid)
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // exited meanwhile
		}
		for _, fd := range fds {
			link, err := os.Readlink(dir + "/" + fd.Name())
			if err != nil {
				continue
			}
			if rest, ok := strings.CutPrefix(link, "socket:["); ok {
				if ino, err := strconv.ParseUint(strings.TrimSuffix(rest, "]"), 10, 64); err == nil {
					owners[ino] = pid
				}
			}
		}
	}
	return owners, nil
}

// listing is one client PgBouncer lists: its application_name, its client
// port, and the front's port.
type listing struct {
	app   string
	port  int
	front int
	since string // connect_time as PgBouncer writes it (sorts as time)
	inode uint64 // of the client socket, once found
	// early, late: its client end was in the socket table read before the
	// listings (held at the start of the sample), in one read after them
	// (held at its end).
	early, late bool
}

// clientEnds lists the established loopback TCP connections by their
// client end, (client port, server port), from /proc/net/tcp: the kernel's
// view of which connections some process still holds, with the socket's
// inode (which process holds it: see socketOwners).
func clientEnds() (map[[2]int]uint64, error) {
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	const loopback = "0100007F" // 127.0.0.1 as /proc/net/tcp writes it
	ends := map[[2]int]uint64{}
	sc := bufio.NewScanner(f)
	// Large reads: the kernel writes the table a read at a time, resuming
	// by position, and entries that move between two reads are skipped.
	sc.Buffer(make([]byte, 4<<20), 4<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "01" { // 01: ESTABLISHED
			continue
		}
		lip, lport, ok1 := strings.Cut(fields[1], ":")
		rip, rport, ok2 := strings.Cut(fields[2], ":")
		if !ok1 || !ok2 || lip != loopback || rip != loopback {
			continue
		}
		lp, err1 := strconv.ParseInt(lport, 16, 32)
		rp, err2 := strconv.ParseInt(rport, 16, 32)
		ino, err3 := strconv.ParseUint(fields[9], 10, 64)
		if err1 == nil && err2 == nil && err3 == nil {
			ends[[2]int{int(lp), int(rp)}] = max(ino, 1)
		}
	}
	return ends, sc.Err()
}

// frontListings reads SHOW CLIENTS of the PgBouncer on `port`: the
// application_name and client port of each client connection to the
// source database. PgBouncer can list a client for a long time after the
// process that opened it exited (seen in the scale bench: the clients of
// an exited shard process listed for minutes, their sockets established
// on PgBouncer's side only), so warehouseApps keeps only the listings
// whose client end the kernel still has.
func frontListings(ctx context.Context, s scaleSpec, port int) ([]listing, error) {
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
	app, db, cport, since := -1, -1, -1, -1
	for i, f := range rows.FieldDescriptions() {
		switch f.Name {
		case "application_name":
			app = i
		case "database":
			db = i
		case "port":
			cport = i
		case "connect_time":
			since = i
		}
	}
	if app < 0 || db < 0 || cport < 0 || since < 0 {
		return nil, fmt.Errorf("SHOW CLIENTS has no application_name, database, port or connect_time column")
	}
	var listed []listing
	for rows.Next() {
		v := rows.RawValues()
		if string(v[db]) != s.Database {
			continue
		}
		p, err := strconv.Atoi(string(v[cport]))
		if err != nil {
			return nil, fmt.Errorf("SHOW CLIENTS port %q: %w", v[cport], err)
		}
		listed = append(listed, listing{app: string(v[app]), port: p, front: port, since: string(v[since])})
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return newestPerPort(listed), nil
}

// newestPerPort keeps, of the listings of one front that share a client
// port, only those connected last: the kernel holds one connection per
// (client port, front) at a time, so an older listing on the port is a
// dead one whose port a later connection took again, possibly in the same
// process (the owner check of byTheirOwners cannot see that case). Ties
// (connect_time has whole seconds) are all kept.
func newestPerPort(listed []listing) []listing {
	newest := map[int]string{}
	for _, l := range listed {
		if l.since > newest[l.port] {
			newest[l.port] = l.since
		}
	}
	out := listed[:0]
	for _, l := range listed {
		if l.since == newest[l.port] {
			out = append(out, l)
		}
	}
	return out
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

// A front can list a dead client beside the live one that took its port
// again; only the newer counts, and listings on other ports are kept.
func TestNewestListingPerPort(t *testing.T) {
	in := []listing{
		{app: "shardpool/ns/a/0/old", port: 40000, front: 6432, since: "2026-12-07 04:40:31 UTC"},
		{app: "shardpool/ns/a/0/new", port: 40000, front: 6432, since: "2026-12-07 04:41:02 UTC"},
		{app: "shardpool/ns/b/1/tok", port: 40001, front: 6432, since: "2026-12-07 04:40:31 UTC"},
	}
	got := newestPerPort(in)
	if len(got) != 2 || got[0].app != "shardpool/ns/a/0/new" || got[1].app != "shardpool/ns/b/1/tok" {
		t.Fatalf("newest per port: got %+v", got)
	}
}
