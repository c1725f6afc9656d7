package tests

// The processes' side of a scale run: pids and CPU time from /proc, the
// Prometheus text of the pods and of the API server (write requests by
// resource, histogram quantiles).

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

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
