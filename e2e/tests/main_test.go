package tests

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"
	"time"
)

// examples are the DataSources e2e/install.sh applies; every test removes
// whatever else it creates.
var examples = map[string]bool{"tenants/acme": true, "tenants/globex": true, "tenants/initech": true}

// TestMain runs the suite, then (when the whole suite ran and passed)
// checks that it left no DataSource behind besides the examples, so that
// `make test` runs twice in a row on one cluster and a `make demo` cluster
// ends as it began. A run of chosen tests (-run, as the benchmarks do) is
// not checked.
func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	whole := flag.Lookup("test.run") == nil || flag.Lookup("test.run").Value.String() == ""
	if code == 0 && whole && os.Getenv("SHARDPOOL_E2E_UNINSTALL") == "" {
		if left := leftovers(2 * time.Minute); len(left) > 0 {
			fmt.Fprintf(os.Stderr, "FAIL: the suite left DataSources behind: %s\n", strings.Join(left, ", "))
			code = 1
		}
	}
	os.Exit(code)
}

// leftovers lists DataSources other than the examples, waiting up to
// `within` for ones being deleted to go.
func leftovers(within time.Duration) []string {
	deadline := time.Now().Add(within)
	for {
		out, err := exec.Command("kubectl", "get", "datasources", "-A", "-o",
			`jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}`).Output()
		var left []string
		if err != nil {
			left = []string{fmt.Sprintf("(kubectl get datasources: %v)", err)}
		} else {
			for _, k := range strings.Fields(string(out)) {
				if !examples[k] {
					left = append(left, k)
				}
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			sort.Strings(left)
			if len(left) > 20 {
				left = append(left[:20], fmt.Sprintf("and %d more", len(left)-20))
			}
			return left
		}
		time.Sleep(2 * time.Second)
	}
}
