package podrunner

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
)

// tokenLifetime is how long a pod's ServiceAccount token lives; it is
// refreshed at half of that, like the kubelet does.
const tokenLifetime = time.Hour

// podWorker runs one pod: its IP, credentials, containers and status.
// One goroutine (run) owns the pod's lifecycle; containers report to it
// through kick.
type podWorker struct {
	r   *Runner
	uid types.UID
	ns  string
	// name of the pod, for logs and API calls.
	name string
	dir  string
	ip   string
	// apiHost and apiPort are where this pod reaches the API server (its
	// own toxiproxy listener when the runner has a toxiproxy).
	apiHost, apiPort string
	// armed is set (under mu) once the pod was seen with the orphan
	// annotation: its deletion then leaves its processes running.
	armed bool
	// keepIP is set when the pod was orphaned: its process still uses the
	// IP, so it is not handed to another pod.
	keepIP bool

	// mu guards pod (the newest version seen) and containers' slice header.
	mu   sync.Mutex
	pod  *corev1.Pod
	ctrs []*container

	// kick wakes run after a pod update or a container state change (buffered 1).
	kick chan struct{}
	// goneCh is closed when the pod disappeared from the API server.
	goneCh   chan struct{}
	goneOnce sync.Once
	// stopCh is closed when the runner itself shuts down.
	stopCh   chan struct{}
	stopOnce sync.Once

	startTime metav1.Time
}

func newPodWorker(r *Runner, p *corev1.Pod) *podWorker {
	return &podWorker{
		r:      r,
		uid:    p.UID,
		ns:     p.Namespace,
		name:   p.Name,
		dir:    filepath.Join(r.cfg.StateDir, "pods", fmt.Sprintf("%s_%s_%s", p.Namespace, p.Name, string(p.UID)[:8])),
		pod:    p,
		kick:   make(chan struct{}, 1),
		goneCh: make(chan struct{}),
		stopCh: make(chan struct{}),
	}
}

func (w *podWorker) update(p *corev1.Pod) {
	w.mu.Lock()
	w.pod = p
	w.mu.Unlock()
	w.arm(p)
	w.wake()
}

func (w *podWorker) wake() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *podWorker) gone()     { w.goneOnce.Do(func() { close(w.goneCh) }) }
func (w *podWorker) shutdown() { w.stopOnce.Do(func() { close(w.stopCh) }) }

func (w *podWorker) current() *corev1.Pod {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pod
}

func (w *podWorker) logf(format string, args ...interface{}) {
	klog.Infof("pod %s/%s: %s", w.ns, w.name, fmt.Sprintf(format, args...))
}

// run is the pod's lifecycle: set up, start containers, keep status current,
// and on deletion stop the containers and remove the pod.
func (w *podWorker) run() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if w.current().DeletionTimestamp != nil {
		w.finalize(ctx)
		return
	}
	ip, err := w.r.ips.allocate()
	if err != nil {
		w.logf("%v", err)
		return
	}
	w.ip = ip
	defer func() {
		if !w.keepIP {
			w.r.ips.release(ip)
			w.r.dropAPIProxy(w.ns, w.name)
		}
	}()
	if w.apiHost, w.apiPort, err = w.r.apiEndpoint(w.ns, w.name); err != nil {
		w.logf("%v; the pod reaches the API server directly", err)
		w.apiHost, w.apiPort = w.r.cfg.APIServerHost, w.r.cfg.APIServerPort
	}
	w.startTime = metav1.Now()
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		w.logf("state dir: %v", err)
		return
	}
	defer os.RemoveAll(w.dir)

	// Credentials first: a pod that cannot get its token does not start.
	tokenRefresh := time.NewTimer(0)
	defer tokenRefresh.Stop()
	if err := w.writeCredentials(ctx); err != nil {
		w.logf("service account token: %v (will retry)", err)
		tokenRefresh.Reset(2 * time.Second)
	} else {
		tokenRefresh.Reset(tokenLifetime / 2)
		w.startContainers(ctx)
	}
	w.syncStatus(ctx)

	for {
		select {
		case <-w.kick:
		case <-tokenRefresh.C:
			if err := w.writeCredentials(ctx); err != nil {
				w.logf("service account token: %v (will retry)", err)
				tokenRefresh.Reset(2 * time.Second)
			} else {
				tokenRefresh.Reset(tokenLifetime / 2)
				w.startContainers(ctx)
			}
		case <-w.goneCh:
			if w.orphaned() {
				w.orphan()
				return
			}
			w.logf("removed from the API server; killing its processes")
			w.terminate(0)
			return
		case <-w.stopCh:
			w.terminate(10)
			return
		}
		if w.current().DeletionTimestamp != nil {
			w.finalize(ctx)
			return
		}
		w.syncStatus(ctx)
	}
}

// startContainers starts every container once; later calls do nothing.
func (w *podWorker) startContainers(ctx context.Context) {
	w.mu.Lock()
	if w.ctrs != nil {
		w.mu.Unlock()
		return
	}
	p := w.pod
	for i := range p.Spec.Containers {
		w.ctrs = append(w.ctrs, newContainer(w, p, &p.Spec.Containers[i]))
	}
	ctrs := w.ctrs
	w.mu.Unlock()
	for _, c := range ctrs {
		go c.loop(ctx)
	}
}

// finalize stops the containers within the deletion grace period and then
// removes the pod object, as the kubelet does.
func (w *podWorker) finalize(ctx context.Context) {
	p := w.current()
	grace := int64(30)
	if p.Spec.TerminationGracePeriodSeconds != nil {
		grace = *p.Spec.TerminationGracePeriodSeconds
	}
	if p.DeletionGracePeriodSeconds != nil {
		grace = *p.DeletionGracePeriodSeconds
	}
	if w.orphaned() {
		w.orphan()
	} else {
		w.logf("deleted; stopping containers (grace %ds)", grace)
		w.terminate(grace)
	}
	zero := int64(0)
	uid := w.uid
	err := w.r.client.CoreV1().Pods(w.ns).Delete(ctx, w.name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		w.logf("final delete: %v", err)
	}
}

// terminate stops all containers: SIGTERM, then SIGKILL after grace seconds.
func (w *podWorker) terminate(grace int64) {
	w.mu.Lock()
	ctrs := w.ctrs
	w.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range ctrs {
		wg.Add(1)
		go func(c *container) {
			defer wg.Done()
			c.stop(time.Duration(grace) * time.Second)
		}(c)
	}
	wg.Wait()
}

// writeCredentials requests a ServiceAccount token bound to the pod and
// writes it with the CA, the namespace and a kubeconfig that reads the token
// from its file (so refreshed tokens are picked up).
func (w *podWorker) writeCredentials(ctx context.Context) error {
	p := w.current()
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	ca, err := os.ReadFile(w.r.cfg.CAFile)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(w.dir, "ca.crt"), ca, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(w.dir, "namespace"), []byte(w.ns), 0o644); err != nil {
		return err
	}
	token := ""
	if p.Spec.AutomountServiceAccountToken == nil || *p.Spec.AutomountServiceAccountToken {
		exp := int64(tokenLifetime / time.Second)
		tr, err := w.r.client.CoreV1().ServiceAccounts(w.ns).CreateToken(ctx, sa, &authv1.TokenRequest{
			Spec: authv1.TokenRequestSpec{
				ExpirationSeconds: &exp,
				BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: w.name, UID: w.uid},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		token = tr.Status.Token
	}
	tmp := filepath.Join(w.dir, "token.tmp")
	if err := os.WriteFile(tmp, []byte(token), 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(w.dir, "token")); err != nil {
		return err
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: https://%s:%s
    certificate-authority: %s
users:
- name: serviceaccount
  user:
    tokenFile: %s
contexts:
- name: pod
  context:
    cluster: cluster
    user: serviceaccount
    namespace: %s
current-context: pod
`, w.apiHost, w.apiPort, filepath.Join(w.absDir(), "ca.crt"), filepath.Join(w.absDir(), "token"), w.ns)
	return os.WriteFile(filepath.Join(w.dir, "kubeconfig"), []byte(kc), 0o600)
}

func (w *podWorker) absDir() string {
	a, err := filepath.Abs(w.dir)
	if err != nil {
		return w.dir
	}
	return a
}

// syncStatus writes the pod status when the API server's copy differs from
// what the runner observes. Comparing with the server's copy (not with the
// last write) repairs changes made by others, e.g. the node lifecycle
// controller marking pods not ready.
func (w *podWorker) syncStatus(ctx context.Context) {
	p := w.current()
	st := w.buildStatus(p)
	if statusKey(&p.Status) == statusKey(st) {
		return
	}
	for attempt := 0; attempt < 5; attempt++ {
		cp := p.DeepCopy()
		cp.Status = *st
		_, err := w.r.client.CoreV1().Pods(w.ns).UpdateStatus(ctx, cp, metav1.UpdateOptions{})
		if err == nil {
			return
		}
		if apierrors.IsNotFound(err) {
			w.gone()
			return
		}
		if !apierrors.IsConflict(err) {
			w.logf("status update: %v", err)
			time.Sleep(200 * time.Millisecond)
		}
		fresh, gerr := w.r.client.CoreV1().Pods(w.ns).Get(ctx, w.name, metav1.GetOptions{})
		if gerr != nil {
			if apierrors.IsNotFound(gerr) {
				w.gone()
			}
			return
		}
		if fresh.UID != w.uid {
			w.gone()
			return
		}
		p = fresh
		st = w.buildStatus(p)
	}
	// Could not write now; try again on the next event.
	go func() { time.Sleep(time.Second); w.wake() }()
}

// statusKey is what the runner owns in a pod status, as a comparable string.
func statusKey(s *corev1.PodStatus) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s|%s|", s.Phase, s.PodIP)
	for _, c := range s.Conditions {
		fmt.Fprintf(&b, "%s=%s,", c.Type, c.Status)
	}
	for _, c := range s.ContainerStatuses {
		state := "waiting"
		switch {
		case c.State.Running != nil:
			state = "running:" + c.ContainerID
		case c.State.Terminated != nil:
			state = fmt.Sprintf("terminated:%d", c.State.Terminated.ExitCode)
		case c.State.Waiting != nil:
			state = "waiting:" + c.State.Waiting.Reason
		}
		fmt.Fprintf(&b, "|%s:%v:%d:%s", c.Name, c.Ready, c.RestartCount, state)
	}
	return b.String()
}

func (w *podWorker) buildStatus(p *corev1.Pod) *corev1.PodStatus {
	w.mu.Lock()
	ctrs := w.ctrs
	w.mu.Unlock()
	st := &corev1.PodStatus{
		Phase:     corev1.PodPending,
		HostIP:    "127.0.0.1",
		HostIPs:   []corev1.HostIP{{IP: "127.0.0.1"}},
		PodIP:     w.ip,
		PodIPs:    []corev1.PodIP{{IP: w.ip}},
		StartTime: &w.startTime,
		QOSClass:  p.Status.QOSClass,
	}
	allReady := len(ctrs) > 0
	running, succeeded, failed := 0, 0, 0
	for _, c := range ctrs {
		cs := c.status()
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
		if !cs.Ready {
			allReady = false
		}
		switch {
		case cs.State.Running != nil:
			running++
		case cs.State.Terminated != nil && cs.State.Terminated.ExitCode == 0:
			succeeded++
		case cs.State.Terminated != nil:
			failed++
		}
	}
	n := len(ctrs)
	switch {
	case n > 0 && succeeded == n:
		st.Phase = corev1.PodSucceeded
	case n > 0 && succeeded+failed == n:
		st.Phase = corev1.PodFailed
	case running > 0 || (n > 0 && succeeded+failed+running > 0):
		st.Phase = corev1.PodRunning
	case n > 0:
		// Restarting containers keep the pod Running, as the kubelet does.
		for _, cs := range st.ContainerStatuses {
			if cs.RestartCount > 0 {
				st.Phase = corev1.PodRunning
			}
		}
	}
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		c := corev1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()}
		for _, old := range p.Status.Conditions {
			if old.Type == t && old.Status == s {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
		return c
	}
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodScheduled, true),
		cond(corev1.PodReadyToStartContainers, n > 0),
		cond(corev1.PodInitialized, true),
		cond(corev1.ContainersReady, allReady),
		cond(corev1.PodReady, allReady),
	}
	return st
}

// killLeftovers kills the process groups recorded by a previous runner that
// did not stop cleanly, and clears its pod directories.
func killLeftovers(podsDir string) {
	files, _ := filepath.Glob(filepath.Join(podsDir, "*", "*.pid"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		klog.Infof("podrunner: killing leftover process group %d (%s)", pid, f)
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	entries, _ := os.ReadDir(podsDir)
	for _, e := range entries {
		_ = os.RemoveAll(filepath.Join(podsDir, e.Name()))
	}
}
