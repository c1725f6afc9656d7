// Package tests holds shardpool's end-to-end tests. They talk to the
// cluster named by KUBECONFIG (e2e/up.sh writes one for the local cluster;
// a real cluster works too) and fail, rather than skip, without one.
package tests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// stateDir is the local cluster's state directory (e2e/.state unless
// LOCALKUBE_STATE says otherwise, as in e2e/lib.sh).
func stateDir() string {
	if d := os.Getenv("LOCALKUBE_STATE"); d != "" {
		return d
	}
	return filepath.Join(repoRoot(), "e2e", ".state")
}

func restConfig(t *testing.T) *rest.Config {
	t.Helper()
	kc := os.Getenv("KUBECONFIG")
	if kc == "" {
		t.Fatal("KUBECONFIG is not set: run e2e/up.sh and source e2e/.state/env (or point it at a cluster)")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		t.Fatalf("kubeconfig %s: %v", kc, err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	return cfg
}

func client(t *testing.T) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(restConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// tempNamespace creates a namespace for one test and deletes it afterwards.
func tempNamespace(t *testing.T, c kubernetes.Interface, prefix string) string {
	t.Helper()
	ns, err := c.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	t.Cleanup(func() {
		_ = c.CoreV1().Namespaces().Delete(context.Background(), ns.Name, metav1.DeleteOptions{})
	})
	grantTenantNamespace(t, c, ns.Name)
	return ns.Name
}

// grantTenantNamespace does what the platform team does to onboard a tenant
// namespace without a helm upgrade: it binds the shards' secrets
// ClusterRole there, so shards may read the DataSources' Secrets in it.
func grantTenantNamespace(t *testing.T, c kubernetes.Interface, ns string) {
	t.Helper()
	_, err := c.RbacV1().RoleBindings(ns).Create(context.Background(), &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "shardpool-shard-secrets"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "shardpool-shard-secrets"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "shardpool-shard", Namespace: systemNS}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("bind the shards' secrets role in %s: %v", ns, err)
	}
}

// eventually polls cond every interval until it returns true or timeout.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for {
		ok, err := cond()
		if ok {
			return
		}
		lastErr = err
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %s (last error: %v)", what, timeout, lastErr)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// shardLogLines returns the last max lines that mention key (a source's
// namespace/name) across every shard pod's log, each prefixed with its pod.
func shardLogLines(key string, max int) string {
	files, _ := filepath.Glob(filepath.Join(stateDir(), "logs", systemNS+"_shardpool-shard-*.log"))
	var lines []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		pod := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(f), systemNS+"_"), ".log")
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, key) {
				lines = append(lines, pod+": "+l)
			}
		}
	}
	if len(lines) > max {
		lines = lines[len(lines)-max:]
	}
	return strings.Join(lines, "\n")
}

// kubectl runs kubectl with the test's KUBECONFIG and returns stdout, stderr.
func kubectl(t *testing.T, stdin string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		return out.String(), errb.String(), fmt.Errorf("kubectl %v timed out", args)
	}
	return out.String(), errb.String(), err
}

// warehouseSources is the manifest of a Secret and n DataSources named
// fmt.Sprintf(nameFormat, i) in ns, all pointing at the acme database of the
// local warehouse as its superuser, with the given pool sizes.
func warehouseSources(ns, nameFormat string, n, minIdle, maxSize int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Secret\nmetadata: {name: acme-warehouse, namespace: %s}\nstringData: {password: %q}\n", ns, os.Getenv("WAREHOUSE_PGPASSWORD"))
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "---\napiVersion: shardpool.dev/v1alpha1\nkind: DataSource\nmetadata: {name: %s, namespace: %s}\nspec: {host: %s, port: %s, database: acme, user: %s, passwordSecretRef: {name: acme-warehouse, key: password}, tls: {mode: disable}, pool: {minIdle: %d, maxSize: %d}}\n",
			fmt.Sprintf(nameFormat, i), ns, os.Getenv("WAREHOUSE_PGHOST"), os.Getenv("WAREHOUSE_PGPORT"), os.Getenv("WAREHOUSE_PGUSER"), minIdle, maxSize)
	}
	return b.String()
}

// installCredential reads a credential that e2e/install.sh left in
// <state>/install/<name>, trimmed.
func installCredential(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(stateDir(), "install", name))
	if err != nil {
		t.Fatalf("%s: %v (run e2e/install.sh)", name, err)
	}
	return strings.TrimSpace(string(b))
}

// appOwner splits a server connection's application_name,
// "shardpool/<ns>/<name>/<shard>/<token>", into its source "<ns>/<name>",
// its shard and its owning process "<shard>/<token>"; ok is false for any
// other name.
func appOwner(app string) (source, shard, owner string, ok bool) {
	parts := strings.Split(app, "/")
	if len(parts) != 5 || parts[0] != "shardpool" {
		return "", "", "", false
	}
	return parts[1] + "/" + parts[2], parts[3], parts[3] + "/" + parts[4], true
}

// placementScore is the operator's stable score of a source key on a shard
// (src/operator/assign.rs: FNV-1a of the key mixed with the shard index
// through splitmix64).
func placementScore(key string, shard uint32) uint64 {
	h := uint64(0xcbf29ce484222325)
	for _, b := range []byte(key) {
		h ^= uint64(b)
		h *= 0x00000100000001b3
	}
	return splitmix64(h ^ splitmix64(uint64(shard)+0x9e3779b97f4a7c15))
}

func splitmix64(z uint64) uint64 {
	z += 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// placedAmong says whether the operator is done recording the shard count
// for source `key` ("<ns>/<name>") at `shards` shards, given the count it
// recorded: it writes assignedAmong only where the count could change a
// later move, which is when the source's preferred shard among the larger
// of the two counts lies between them (assign::placement_matters).
func placedAmong(key string, recorded, shards int) bool {
	if recorded == shards {
		return true
	}
	if recorded <= 0 || shards <= 0 {
		return false
	}
	lo, hi := min(recorded, shards), max(recorded, shards)
	return preferredShard(key, hi) < lo
}

// preferredShard is the shard among 0..count-1 with the highest placement
// score for key: where the operator places the source among count shards.
func preferredShard(key string, count int) int {
	top, best := uint32(0), placementScore(key, 0)
	for s := uint32(1); s < uint32(count); s++ {
		if v := placementScore(key, s); v > best {
			top, best = s, v
		}
	}
	return int(top)
}
