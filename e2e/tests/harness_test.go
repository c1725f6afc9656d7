package tests

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// runScript runs an e2e/ script with a private state directory and extra
// environment; it must finish within 90 seconds (no hangs).
func runScript(t *testing.T, script string, env ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(repoRoot(), "e2e", script))
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s did not finish within 90s:\n%s", script, out)
	}
	return string(out), err
}

func freePort(t *testing.T) (int, net.Listener) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l.Addr().(*net.TCPAddr).Port, l
}

// A port already taken stops up.sh at once with a message naming the port.
func TestUpRefusesATakenPort(t *testing.T) {
	state := t.TempDir()
	port, l := freePort(t)
	defer l.Close()
	out, err := runScript(t, "up.sh",
		"LOCALKUBE_STATE="+state,
		"LOCALKUBE_APISERVER_PORT="+strconv.Itoa(port),
	)
	if err == nil {
		t.Fatalf("up.sh succeeded with port %d taken:\n%s", port, out)
	}
	if !strings.Contains(out, "port "+strconv.Itoa(port)) || !strings.Contains(out, "already taken") {
		t.Fatalf("up.sh does not say which port is taken:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(state, "pids", "etcd.pid")); err == nil {
		t.Fatal("up.sh started etcd although a port was taken")
	}
}

// A half-started previous run (a recorded component that is no longer
// running) is reported with the way out, not silently reused.
func TestUpReportsAHalfStartedRun(t *testing.T) {
	state := t.TempDir()
	if err := os.MkdirAll(filepath.Join(state, "pids"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A pid that is certainly not running: a finished child of ours.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	pid := strconv.Itoa(dead.ProcessState.Pid())
	if err := os.WriteFile(filepath.Join(state, "pids", "apiserver.pid"), []byte(pid), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := runScript(t, "up.sh", "LOCALKUBE_STATE="+state)
	if err == nil {
		t.Fatalf("up.sh succeeded over a half-started run:\n%s", out)
	}
	for _, want := range []string{"half up", "apiserver", "down.sh"} {
		if !strings.Contains(out, want) {
			t.Errorf("message lacks %q:\n%s", want, out)
		}
	}
	// down.sh clears it.
	if out, err := runScript(t, "down.sh", "LOCALKUBE_STATE="+state); err != nil {
		t.Fatalf("down.sh: %v\n%s", err, out)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("down.sh left %s behind", state)
	}
}

// Without a Go toolchain, up.sh says so instead of failing obscurely.
func TestUpExplainsAMissingGoToolchain(t *testing.T) {
	state := t.TempDir()
	// A PATH with the basic tools but no go.
	bin := t.TempDir()
	for _, tool := range []string{"bash", "cat", "dirname", "mkdir", "kubectl", "ls", "sort", "tail", "setsid", "grep", "awk", "date"} {
		if p, err := exec.LookPath(tool); err == nil {
			_ = os.Symlink(p, filepath.Join(bin, tool))
		}
	}
	out, err := runScript(t, "up.sh", "LOCALKUBE_STATE="+state, "PATH="+bin)
	if err == nil {
		t.Fatalf("up.sh succeeded without go:\n%s", out)
	}
	if !strings.Contains(out, "Go toolchain is missing") {
		t.Fatalf("message does not name the missing Go toolchain:\n%s", out)
	}
}
