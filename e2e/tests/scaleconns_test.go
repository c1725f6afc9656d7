package tests

// Server connections counted from the warehouse side, per application_name:
// PostgreSQL's pg_stat_activity, or SHOW CLIENTS of the PgBouncer fronts
// that stand in for warehouses at a scale PostgreSQL cannot hold here.

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

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
