package tests

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

type httpResult struct {
	Columns []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	} `json:"columns"`
	Rows       [][]any `json:"rows"`
	RowCount   int     `json:"rowCount"`
	CommandTag string  `json:"commandTag"`
	ElapsedMs  float64 `json:"elapsedMs"`
	Error      *struct {
		SQLState string `json:"sqlstate"`
		Message  string `json:"message"`
	} `json:"error"`
}

func postQuery(t *testing.T, ip, token, ns, name, body string) (int, httpResult, http.Header) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+ip+":8080/v1/namespaces/"+ns+"/datasources/"+name+"/query", bytes.NewBufferString(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	hc := http.Client{Timeout: 30 * time.Second}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	defer resp.Body.Close()
	var r httpResult
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("decode: %v", err)
	}
	return resp.StatusCode, r, resp.Header
}

// The HTTP/JSON API answers queries with typed columns and rows, and says
// whose fault an error was through its status code.
func TestHTTPAPI(t *testing.T) {
	ip, _ := installed(t)
	token := installCredential(t, "router-http-token")

	code, r, _ := postQuery(t, ip, token, "tenants", "globex", `{"sql": "SELECT origin, count(*) AS n, $1::text AS tag FROM shipments GROUP BY 1 ORDER BY 1", "params": ["q1"]}`)
	if code != 200 || r.Error != nil {
		t.Fatalf("query: %d %+v", code, r.Error)
	}
	if len(r.Columns) != 3 || r.Columns[0].Name != "origin" || r.Columns[1].Type != "int8" || r.Columns[2].Type != "text" {
		t.Fatalf("columns: %+v", r.Columns)
	}
	if r.RowCount != 3 || r.CommandTag != "SELECT 3" || len(r.Rows) != 3 {
		t.Fatalf("rows: %d %q %v", r.RowCount, r.CommandTag, r.Rows)
	}
	if r.Rows[0][0] != "Antwerp" || r.Rows[0][1] != float64(100) || r.Rows[0][2] != "q1" {
		t.Fatalf("first row: %v", r.Rows[0])
	}
	t.Logf("HTTP query answered in %.1f ms (router-measured)", r.ElapsedMs)

	cases := []struct {
		name, token, ns, source, body string
		status                        int
		sqlstate                      string
	}{
		{"bad sql", token, "tenants", "acme", `{"sql": "SELEC 1"}`, 400, "42601"},
		{"division by zero", token, "tenants", "acme", `{"sql": "SELECT 1/0"}`, 400, "22012"},
		{"no token", "", "tenants", "acme", `{"sql": "SELECT 1"}`, 401, "28000"},
		{"wrong token", "not-a-valid-token-at-all", "tenants", "acme", `{"sql": "SELECT 1"}`, 401, "28000"},
		{"namespace not allowed", token, "kube-system", "acme", `{"sql": "SELECT 1"}`, 404, "3D000"},
		{"unknown source", token, "tenants", "nope", `{"sql": "SELECT 1"}`, 404, "3D000"},
		{"bad body", token, "tenants", "acme", `{"query": "SELECT 1"}`, 400, "08P01"},
		{"timeout", token, "tenants", "acme", `{"sql": "SELECT pg_sleep(5)", "timeoutMs": 300}`, 504, "57014"},
	}
	for _, c := range cases {
		code, r, _ := postQuery(t, ip, c.token, c.ns, c.source, c.body)
		if code != c.status || r.Error == nil || r.Error.SQLState != c.sqlstate {
			t.Errorf("%s: status %d error %+v, want %d with SQLSTATE %s", c.name, code, r.Error, c.status, c.sqlstate)
		}
	}
	// The source still answers after the cancelled query.
	if code, r, _ := postQuery(t, ip, token, "tenants", "acme", `{"sql": "SELECT count(*) FROM orders"}`); code != 200 || len(r.Rows) != 1 || r.Rows[0][0] != float64(500) {
		t.Fatalf("after timeout: %d %+v %v", code, r.Error, r.Rows)
	}
}

// With Accept: application/x-ndjson a result streams: a columns line, one
// line per row as the warehouse produces them (the first arrives long
// before the last is computed), then a summary line; an error before the
// first row keeps its status code.
func TestHTTPNDJSONStreams(t *testing.T) {
	ip, _ := installed(t)
	token := installCredential(t, "router-http-token")
	post := func(sql string) (*http.Response, time.Time) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, "http://"+ip+":8080/v1/namespaces/tenants/datasources/acme/query", strings.NewReader(`{"sql": "`+sql+`", "timeoutMs": 20000}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Accept", "application/x-ndjson")
		hc := http.Client{Timeout: 30 * time.Second}
		start := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("POST: %v", err)
		}
		return resp, start
	}

	// 4 rows of 100 kB, 0.5 s apart.
	resp, start := post("SELECT g, repeat('x', 100000) AS pad, pg_sleep(0.5) FROM generate_series(1, 4) g")
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("status %d, Content-Type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var lines []string
	var firstRow time.Duration
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) == 2 {
			firstRow = time.Since(start)
		}
	}
	total := time.Since(start)
	if len(lines) != 6 {
		t.Fatalf("want columns + 4 rows + summary, got %d lines", len(lines))
	}
	var cols struct {
		Columns []struct{ Name, Type string } `json:"columns"`
	}
	if err := json.Unmarshal([]byte(lines[0]), &cols); err != nil || len(cols.Columns) != 3 || cols.Columns[0].Name != "g" || cols.Columns[0].Type != "int4" {
		t.Fatalf("columns line %q: %v", lines[0], err)
	}
	var row []any
	if err := json.Unmarshal([]byte(lines[1]), &row); err != nil || len(row) != 3 || row[0] != float64(1) || len(row[1].(string)) != 100000 {
		t.Fatalf("first row: %v", err)
	}
	var sum struct {
		RowCount   int    `json:"rowCount"`
		CommandTag string `json:"commandTag"`
	}
	if err := json.Unmarshal([]byte(lines[5]), &sum); err != nil || sum.RowCount != 4 || sum.CommandTag != "SELECT 4" {
		t.Fatalf("summary %q: %v", lines[5], err)
	}
	t.Logf("ndjson: first row after %.2fs, whole result after %.2fs", firstRow.Seconds(), total.Seconds())
	if total < 1900*time.Millisecond || firstRow > total-time.Second {
		t.Errorf("rows did not stream: first row after %s, all after %s", firstRow, total)
	}

	// An error before any row keeps its status code and JSON body.
	resp2, _ := post("SELECT * FROM no_such_table")
	defer resp2.Body.Close()
	var r httpResult
	if err := json.NewDecoder(resp2.Body).Decode(&r); err != nil || resp2.StatusCode != 400 || r.Error == nil || r.Error.SQLState != "42P01" {
		t.Fatalf("bad SQL over ndjson: %d %+v %v", resp2.StatusCode, r.Error, err)
	}
}

// A result too large to answer as one JSON document (install.sh sets
// router.maxResultBytes to 8 MiB) is stopped and refused with 400 and
// SQLSTATE 54000 instead of growing the router's memory; the same query
// asked for as NDJSON streams every row; smaller results are unaffected and
// the session's server connection is not left busy.
func TestHTTPBufferedResultIsBounded(t *testing.T) {
	ip, _ := installed(t)
	token := installCredential(t, "router-http-token")
	big := `{"sql": "SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 10000) g", "timeoutMs": 30000}`
	status, r, _ := postQuery(t, ip, token, "tenants", "acme", big)
	if status != 400 || r.Error == nil || r.Error.SQLState != "54000" || !strings.Contains(r.Error.Message, "ndjson") {
		t.Fatalf("10 MB result as JSON: status %d, error %+v; want 400 / 54000 naming NDJSON", status, r.Error)
	}

	req, err := http.NewRequest(http.MethodPost, "http://"+ip+":8080/v1/namespaces/tenants/datasources/acme/query", strings.NewReader(big))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := (&http.Client{Timeout: 60 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	lines := 0
	for sc.Scan() {
		lines++
	}
	if resp.StatusCode != 200 || lines != 10002 {
		t.Fatalf("same result as NDJSON: status %d, %d lines; want 200 and columns + 10000 rows + summary", resp.StatusCode, lines)
	}

	for i := 0; i < 3; i++ {
		status, r, _ = postQuery(t, ip, token, "tenants", "acme", `{"sql": "SELECT g, repeat('x', 1000) FROM generate_series(1, 1000) g"}`)
		if status != 200 || r.RowCount != 1000 {
			t.Fatalf("1 MB result: status %d, rowCount %d, error %+v", status, r.RowCount, r.Error)
		}
	}
}
