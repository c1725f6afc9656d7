// Package fault injects, into the local cluster, the faults production
// clusters see every week, for the end-to-end tests: the kube-apiserver
// hung (SIGSTOP) or stopped and started again; one pod cut off from the
// API server (its own toxiproxy proxy disabled or blackholed); a source's
// network to its warehouse cut, delayed or blackholed (a toxiproxy proxy
// in front of PostgreSQL); a process frozen (SIGSTOP) and resumed; the
// warehouse PostgreSQL restarted; a pod orphaned (its object deleted while
// its process keeps running with its network, as on a node cut off from
// the control plane).
//
// Network faults go through Shopify's toxiproxy (run by localkube); every
// process is found through the pid files e2e/up.sh and the pod runner
// keep, and signalled by pid, never by name.
package fault

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2/client"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Harness injects faults into the local cluster whose state is in State.
type Harness struct {
	// State is the cluster's state directory (e2e/.state).
	State string
	// Kube is an admin client of the cluster.
	Kube kubernetes.Interface
	// Toxi is the client of the cluster's toxiproxy.
	Toxi *toxiproxy.Client
}

// New finds the cluster's toxiproxy through <state>/toxiproxy.url.
func New(state string, kube kubernetes.Interface) (*Harness, error) {
	b, err := os.ReadFile(filepath.Join(state, "toxiproxy.url"))
	if err != nil {
		return nil, fmt.Errorf("no toxiproxy in this cluster (%v): start it with e2e/up.sh", err)
	}
	return &Harness{State: state, Kube: kube, Toxi: toxiproxy.NewClient(strings.TrimSpace(string(b)))}, nil
}

func (h *Harness) pidFile(name string) string {
	return filepath.Join(h.State, "pids", name+".pid")
}

// pid reads a pid file of e2e/up.sh.
func (h *Harness) pid(name string) (int, error) {
	b, err := os.ReadFile(h.pidFile(name))
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("%s: bad pid %q", h.pidFile(name), b)
	}
	return pid, nil
}

// alive reports whether a pid runs (and is not a zombie).
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// State is the field after the parenthesised command.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// waitGone waits until pid has exited, up to timeout.
func waitGone(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if !alive(pid) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return !alive(pid)
}

// signalGroup signals the process group led by pid. It refuses pids that
// would signal something else: 0 or 1 (kill(-0) is the caller's own group)
// and the caller's own group.
func signalGroup(pid int, sig syscall.Signal) error {
	if pid <= 1 || pid == syscall.Getpgrp() {
		return fmt.Errorf("refusing to signal process group %d", pid)
	}
	return syscall.Kill(-pid, sig)
}

// Freeze stops a process group (SIGSTOP) and returns the function that
// resumes it (SIGCONT); resuming one that has died meanwhile is no error.
func Freeze(pid int) (resume func() error, err error) {
	if err := signalGroup(pid, syscall.SIGSTOP); err != nil {
		return nil, fmt.Errorf("SIGSTOP %d: %w", pid, err)
	}
	return func() error {
		if err := signalGroup(pid, syscall.SIGCONT); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("SIGCONT %d: %w", pid, err)
		}
		return nil
	}, nil
}

// HangAPIServer freezes the kube-apiserver: connections stay open, nothing
// is answered. The returned function resumes it.
func (h *Harness) HangAPIServer() (resume func() error, err error) {
	pid, err := h.pid("apiserver")
	if err != nil {
		return nil, err
	}
	return Freeze(pid)
}

// cmdline reads the argument vector of a running process.
func cmdline(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, err
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	if len(args) == 0 || args[0] == "" {
		return nil, fmt.Errorf("pid %d: empty command line", pid)
	}
	return args, nil
}

// relaunch starts argv again as component `name` of the cluster, in its own
// session, logging where up.sh logs it, and records its pid.
func (h *Harness) relaunch(name string, argv []string) error {
	logf, err := os.OpenFile(filepath.Join(h.State, "logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	// Reaped here if it exits while this process lives; otherwise it is
	// the cluster's, tracked by its pid file like the rest.
	go func() { _ = cmd.Wait() }()
	return os.WriteFile(h.pidFile(name), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
}

// StopAPIServer stops the kube-apiserver (SIGTERM, SIGKILL after 30 s) and
// returns the function that starts it again with the same arguments and
// waits (up to a minute) until it is ready.
func (h *Harness) StopAPIServer() (start func() error, err error) {
	pid, err := h.pid("apiserver")
	if err != nil {
		return nil, err
	}
	argv, err := cmdline(pid)
	if err != nil {
		return nil, err
	}
	_ = signalGroup(pid, syscall.SIGTERM)
	if !waitGone(pid, 30*time.Second) {
		_ = signalGroup(pid, syscall.SIGKILL)
		if !waitGone(pid, 10*time.Second) {
			return nil, fmt.Errorf("kube-apiserver (pid %d) did not stop", pid)
		}
	}
	return func() error {
		if err := h.relaunch("apiserver", argv); err != nil {
			return err
		}
		return h.WaitAPIReady(time.Minute)
	}, nil
}

// WaitAPIReady polls the API server's /readyz.
func (h *Harness) WaitAPIReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := h.Kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		cancel()
		if err == nil {
			return nil
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver not ready after %s: %v", timeout, last)
}

// WaitControllersCaughtUp waits until the cluster's own watchers work
// again after an API server fault: a ReplicaSet created in ns must get its
// pod created (controller-manager), scheduled (scheduler) and running (pod
// runner). Their watches come back with client-go's back-off, which can
// exceed a minute after a long outage; a later fault would otherwise hit a
// cluster that cannot yet start a replacement pod. The ReplicaSet is
// deleted again. Returns how long it took.
func (h *Harness) WaitControllersCaughtUp(ns string, timeout time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	t0 := time.Now()
	one := int32(1)
	labels := map[string]string{"app": "fault-catchup"}
	rs := &appsv1.ReplicaSet{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "fault-catchup-"},
		Spec: appsv1.ReplicaSetSpec{
			Replicas: &one,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: new(int64),
					Containers:                    []corev1.Container{{Name: "sleep", Image: "sleep", Command: []string{"sleep", "600"}}},
				},
			},
		},
	}
	var err error
	for {
		var created *appsv1.ReplicaSet
		if created, err = h.Kube.AppsV1().ReplicaSets(ns).Create(ctx, rs, metav1.CreateOptions{}); err == nil {
			rs = created
			break
		}
		if ctx.Err() != nil {
			return 0, fmt.Errorf("creating a ReplicaSet: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	defer func() {
		bg := metav1.DeletePropagationBackground
		_ = h.Kube.AppsV1().ReplicaSets(ns).Delete(context.Background(), rs.Name, metav1.DeleteOptions{PropagationPolicy: &bg})
	}()
	for {
		pods, err := h.Kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=fault-catchup"})
		if err == nil {
			for _, p := range pods.Items {
				if p.Status.Phase == corev1.PodRunning && metav1.IsControlledBy(&p, rs) {
					return time.Since(t0), nil
				}
			}
		}
		if ctx.Err() != nil {
			return 0, fmt.Errorf("no pod of ReplicaSet %s running after %s", rs.Name, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// PodAPIFault is what happens to one pod's traffic to the API server.
type PodAPIFault int

const (
	// Cut: connections are refused and open ones closed.
	Cut PodAPIFault = iota
	// Blackhole: connections stay open, nothing passes.
	Blackhole
)

// FaultPodAPI cuts or blackholes the API server traffic of one pod (its
// own toxiproxy proxy); the returned function heals it.
func (h *Harness) FaultPodAPI(ns, pod string, f PodAPIFault) (heal func() error, err error) {
	p, err := h.Toxi.Proxy(APIProxyName(ns, pod))
	if err != nil {
		return nil, fmt.Errorf("pod %s/%s has no API proxy: %w", ns, pod, err)
	}
	px := &Proxy{p: p}
	switch f {
	case Cut:
		err = px.Cut()
	case Blackhole:
		err = px.Blackhole()
	}
	if err != nil {
		return nil, err
	}
	return px.Heal, nil
}

// Proxy is a toxiproxy proxy in front of a TCP service.
type Proxy struct {
	p *toxiproxy.Proxy
	// Host and Port are where clients connect to go through it.
	Host string
	Port int
}

// WarehouseProxy puts a proxy named `name` in front of the warehouse
// PostgreSQL (upstream host:port); a DataSource with Host and Port as its
// host and port reaches the warehouse through it.
func (h *Harness) WarehouseProxy(name, upstream string) (*Proxy, error) {
	if old, err := h.Toxi.Proxy(name); err == nil {
		_ = old.Delete()
	}
	p, err := h.Toxi.CreateProxy(name, "127.0.0.1:0", upstream)
	if err != nil {
		return nil, err
	}
	host, port, err := net.SplitHostPort(p.Listen)
	if err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		return nil, err
	}
	return &Proxy{p: p, Host: host, Port: n}, nil
}

// Blackhole lets no byte through in either direction; connections stay
// open (what a network partition looks like to both ends).
func (p *Proxy) Blackhole() error {
	for _, stream := range []string{"downstream", "upstream"} {
		if _, err := p.p.AddToxic("blackhole-"+stream, "timeout", stream, 1, toxiproxy.Attributes{"timeout": 0}); err != nil {
			return fmt.Errorf("blackhole %s: %w", p.p.Name, err)
		}
	}
	return nil
}

// Delay adds latency to every answer.
func (p *Proxy) Delay(d time.Duration) error {
	_, err := p.p.AddToxic("delay", "latency", "downstream", 1, toxiproxy.Attributes{"latency": d.Milliseconds()})
	return err
}

// Cut refuses new connections and closes the open ones.
func (p *Proxy) Cut() error {
	return p.p.Disable()
}

// Heal removes every toxic and lets connections through again.
func (p *Proxy) Heal() error {
	toxics, err := p.p.Toxics()
	if err != nil {
		return err
	}
	for _, t := range toxics {
		if err := p.p.RemoveToxic(t.Name); err != nil {
			return err
		}
	}
	if !p.p.Enabled {
		return p.p.Enable()
	}
	return nil
}

// Delete removes the proxy (its listener closes).
func (p *Proxy) Delete() error {
	return p.p.Delete()
}

// RestartWarehouse stops the warehouse PostgreSQL with a fast shutdown
// (SIGINT to the postmaster: every backend ends with 57P01), keeps it down
// for `down`, starts it again with the same command, and waits until it
// accepts connections. It returns when it went down and when it was ready.
func (h *Harness) RestartWarehouse(down time.Duration, port string) (stopped, ready time.Time, err error) {
	runner, err := h.pid("warehouse")
	if err != nil {
		return stopped, ready, err
	}
	argv, err := cmdline(runner)
	if err != nil {
		return stopped, ready, err
	}
	b, err := os.ReadFile(filepath.Join(h.State, "warehouse", "postmaster.pid"))
	if err != nil {
		return stopped, ready, err
	}
	pm, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil {
		return stopped, ready, fmt.Errorf("postmaster.pid: %w", err)
	}
	if err := syscall.Kill(pm, syscall.SIGINT); err != nil {
		return stopped, ready, fmt.Errorf("SIGINT postmaster %d: %w", pm, err)
	}
	if !waitGone(pm, 30*time.Second) || !waitGone(runner, 10*time.Second) {
		return stopped, ready, fmt.Errorf("the warehouse did not stop within 30 s")
	}
	stopped = time.Now()
	time.Sleep(down)
	if err := h.relaunch("warehouse", argv); err != nil {
		return stopped, ready, err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		if exec.Command("pg_isready", "-q", "-h", "127.0.0.1", "-p", port).Run() == nil {
			return stopped, time.Now(), nil
		}
		if time.Now().After(deadline) {
			return stopped, ready, fmt.Errorf("the warehouse did not accept connections within a minute of its start")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Orphan is a pod whose object was deleted while its process runs on.
type Orphan struct {
	// Pid is the process group of its container.
	Pid int
	h   *Harness
	ns  string
	pod string
}

// OrphanPod orphans a pod as a node cut off from the control plane would:
// its API traffic is cut, its object is deleted at once (no grace), the
// pod runner leaves its process running (with its pod IP and its network
// to everything else), and its Deployment starts a replacement. Kill ends
// the orphan.
func (h *Harness) OrphanPod(ctx context.Context, ns, pod string) (*Orphan, error) {
	p, err := h.Kube.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:"true"}}}`, OrphanAnnotation)
	if _, err := h.Kube.CoreV1().Pods(ns).Patch(ctx, pod, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return nil, err
	}
	// The pod runner must have seen the annotation before the deletion.
	armed := OrphanArmedFile(h.State, ns, pod)
	for wait := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(armed); err == nil {
			break
		}
		if time.Now().After(wait) {
			return nil, fmt.Errorf("the pod runner did not see the orphan annotation of %s/%s within 10 s", ns, pod)
		}
	}
	if _, err := h.FaultPodAPI(ns, pod, Cut); err != nil {
		return nil, err
	}
	zero := int64(0)
	if err := h.Kube.CoreV1().Pods(ns).Delete(ctx, pod, metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &p.UID}}); err != nil {
		return nil, err
	}
	f := OrphanPidFile(h.State, ns, pod)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(f); err == nil {
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err == nil && alive(pid) {
				return &Orphan{Pid: pid, h: h, ns: ns, pod: pod}, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the pod runner did not orphan %s/%s (no live pid in %s)", ns, pod, f)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Kill ends the orphan (SIGKILL to its process group) and forgets it.
func (o *Orphan) Kill() {
	_ = signalGroup(o.Pid, syscall.SIGCONT)
	_ = signalGroup(o.Pid, syscall.SIGKILL)
	waitGone(o.Pid, 10*time.Second)
	_ = os.Remove(OrphanPidFile(o.h.State, o.ns, o.pod))
	_ = os.Remove(OrphanArmedFile(o.h.State, o.ns, o.pod))
	if p, err := o.h.Toxi.Proxy(APIProxyName(o.ns, o.pod)); err == nil {
		_ = p.Delete()
	}
}
