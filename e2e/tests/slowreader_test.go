package tests

import (
	"bufio"
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// slowConn reads at most `rate` bytes per second: a client on a slow
// network, or one that reads its result slowly.
type slowConn struct {
	net.Conn
	rate  int
	start time.Time
	read  int
}

func (c *slowConn) Read(p []byte) (int, error) {
	if c.start.IsZero() {
		c.start = time.Now()
	}
	if len(p) > 16*1024 {
		p = p[:16*1024]
	}
	// Sleep until the bytes read so far fit the rate.
	due := c.start.Add(time.Duration(float64(c.read) / float64(c.rate) * float64(time.Second)))
	if d := time.Until(due); d > 0 {
		time.Sleep(d)
	}
	n, err := c.Conn.Read(p)
	c.read += n
	return n, err
}

// pgbenchP99 runs pgbench -S (select-only, 4 clients, `seconds` long)
// through the router on `db` and returns its p99 and p50 latency from the
// per-transaction log, and the transaction count.
func pgbenchP99(t *testing.T, ip, pw, db string, seconds int) (p99, p50 time.Duration, n int) {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(seconds+60)*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "pgbench", "-h", ip, "-p", "5432", "-U", "bi", "-S", "-M", "extended",
		"-c", "4", "-j", "2", "-T", strconv.Itoa(seconds), "-n", "-l", "--log-prefix="+filepath.Join(dir, "tx"), db)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+pw)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "number of failed transactions: 0 ") {
		t.Fatalf("pgbench -S: %v\n%s", err, out)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "tx*"))
	var lat []time.Duration
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			// client_id transaction_no time_us script_no time_epoch time_us
			fields := strings.Fields(sc.Text())
			if len(fields) < 3 {
				continue
			}
			us, err := strconv.Atoi(fields[2])
			if err != nil {
				continue
			}
			lat = append(lat, time.Duration(us)*time.Microsecond)
		}
		fh.Close()
	}
	if len(lat) < 100 {
		t.Fatalf("pgbench logged %d transactions", len(lat))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat[len(lat)*99/100], lat[len(lat)/2], len(lat)
}

// One client that reads a large result slowly holds back only its own
// session: pgbench -S on another source of the same shard, through the same
// router and the same router-to-shard link, keeps its p99 latency within 2x
// of a run without the slow reader; the slow client still gets every row,
// intact; and the router does not buffer the result (the shard stops
// reading the warehouse while the session is paused). SLOW_READER_MB sets
// the result size (default 40; the README's figures are from 200), read at
// 1 MB/s.
func TestSlowReaderHoldsBackOnlyItself(t *testing.T) {
	ip, pw := installed(t)
	bench := ensureBenchSource(t)
	c := client(t)
	ctx := context.Background()
	mb := 40
	if v, err := strconv.Atoi(os.Getenv("SLOW_READER_MB")); err == nil && v > 0 {
		mb = v
	}

	// A source on the same shard as tenants/bench (rendezvous placement:
	// try a few names).
	benchShard, _, _ := kubectl(t, "", "-n", "tenants", "get", "datasources.shardpool.dev", "bench", "-o", "jsonpath={.status.shard}")
	manifest := ""
	for i := 0; i < 8; i++ {
		manifest += fmt.Sprintf("---\napiVersion: shardpool.dev/v1alpha1\nkind: DataSource\nmetadata: {name: slowreader-%d, namespace: tenants}\nspec: {host: %s, port: %s, database: acme, user: %s, passwordSecretRef: {name: bench-warehouse, key: password}, tls: {mode: disable}, pool: {minIdle: 1, maxSize: 2}}\n",
			i, os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER"))
	}
	if _, stderr, err := kubectl(t, manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, stderr)
	}
	t.Cleanup(func() {
		for i := 0; i < 8; i++ {
			_, _, _ = kubectl(t, "", "-n", "tenants", "delete", "datasources.shardpool.dev", fmt.Sprintf("slowreader-%d", i), "--wait=false")
		}
	})
	var slow string
	eventually(t, 60*time.Second, "a slowreader source Ready on tenants/bench's shard "+benchShard, func() (bool, error) {
		for i := 0; i < 8; i++ {
			out, _, err := kubectl(t, "", "-n", "tenants", "get", "datasources.shardpool.dev", fmt.Sprintf("slowreader-%d", i), "-o", "jsonpath={.status.shard} {.status.phase}")
			if err == nil && out == benchShard+" Ready" {
				slow = fmt.Sprintf("tenants.slowreader-%d", i)
				return true, nil
			}
		}
		return false, nil
	})

	routerPid := 0
	pods, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=router"})
	if err == nil && len(pods.Items) == 1 {
		routerPid = containerPid(&pods.Items[0])
	}
	if routerPid == 0 {
		t.Fatal("no single router pod with a process id")
	}

	seconds := mb / 3
	if seconds < 8 {
		seconds = 8
	}
	if seconds > 60 {
		seconds = 60
	}
	baseP99, baseP50, baseN := pgbenchP99(t, ip, pw, bench, seconds)
	rss0 := rssKiB(t, routerPid)

	// The slow reader: mb MiB of rows (1 KiB each), read at 1 MB/s.
	rows := mb * 1024
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=bi dbname=%s sslmode=disable connect_timeout=10", ip, slow))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = pw
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &slowConn{Conn: conn, rate: 1 << 20}, nil
	}
	type result struct {
		rows, bad int
		err       error
		took      time.Duration
	}
	done := make(chan result, 1)
	var rssMax int
	var mu sync.Mutex
	stopRSS := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopRSS:
				return
			case <-time.After(200 * time.Millisecond):
			}
			if r := rssKiB(t, routerPid); r > 0 {
				mu.Lock()
				if r > rssMax {
					rssMax = r
				}
				mu.Unlock()
			}
		}
	}()
	go func() {
		t0 := time.Now()
		qctx, cancel := context.WithTimeout(ctx, time.Duration(mb)*4*time.Second+60*time.Second)
		defer cancel()
		conn, err := pgx.ConnectConfig(qctx, cfg)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer conn.Close(context.Background())
		r, err := conn.Query(qctx, "SELECT i, repeat(md5(i::text), 31) FROM generate_series(1, $1::int) AS i", rows)
		if err != nil {
			done <- result{err: err}
			return
		}
		var res result
		for r.Next() {
			var i int
			var v string
			if err := r.Scan(&i, &v); err != nil {
				res.err = err
				break
			}
			sum := md5.Sum([]byte(strconv.Itoa(i)))
			if v != strings.Repeat(hex.EncodeToString(sum[:]), 31) || i != res.rows+1 {
				res.bad++
			}
			res.rows++
		}
		if res.err == nil {
			res.err = r.Err()
		}
		res.took = time.Since(t0)
		done <- res
	}()
	// Let the slow session fill its share of the link first.
	time.Sleep(3 * time.Second)
	loadP99, loadP50, loadN := pgbenchP99(t, ip, pw, bench, seconds)
	var res result
	select {
	case res = <-done:
	case <-time.After(time.Duration(mb)*4*time.Second + 90*time.Second):
		t.Fatal("the slow reader did not finish")
	}
	close(stopRSS)
	if res.err != nil {
		t.Fatalf("slow reader: %v (after %d rows)", res.err, res.rows)
	}
	if res.rows != rows || res.bad != 0 {
		t.Fatalf("slow reader got %d rows (%d wrong), want %d intact", res.rows, res.bad, rows)
	}
	mu.Lock()
	grew := rssMax - rss0
	mu.Unlock()
	t.Logf("slow reader: %d rows (%d MiB) intact in %s (%.2f MiB/s); router RSS %d KiB -> max %d KiB (+%d KiB)",
		res.rows, mb, res.took.Round(time.Millisecond), float64(mb)/res.took.Seconds(), rss0, rss0+grew, grew)
	t.Logf("pgbench -S on %s, same shard and link: alone p50 %s p99 %s (%d tx); beside the slow reader p50 %s p99 %s (%d tx); p99 ratio %.2f",
		bench, baseP50, baseP99, baseN, loadP50, loadP99, loadN, float64(loadP99)/float64(baseP99))
	if loadP99 > 2*baseP99 {
		t.Errorf("pgbench p99 %s beside the slow reader is more than 2x its p99 alone (%s)", loadP99, baseP99)
	}
	// The router holds at most about a pause bound of the result (1 MiB)
	// plus what was in flight, not the result.
	if limit := mb * 1024 / 2; grew > limit && grew > 16*1024 {
		t.Errorf("router RSS grew by %d KiB during a %d MiB slow read: the result was buffered, not paused", grew, mb)
	}
}

// rssKiB is a process's resident set size in KiB (0 when it cannot be read).
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			if len(f) >= 2 {
				v, _ := strconv.Atoi(f[1])
				return v
			}
		}
	}
	return 0
}
