package podrunner

import (
	"fmt"
	"net"
	"os"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"shardpool.dev/e2e/fault"
)

// apiEndpoint returns where a pod reaches the API server: a toxiproxy
// listener of its own when the runner has a toxiproxy, else the API
// server itself.
func (r *Runner) apiEndpoint(ns, pod string) (host, port string, err error) {
	if r.toxi == nil {
		return r.cfg.APIServerHost, r.cfg.APIServerPort, nil
	}
	name := fault.APIProxyName(ns, pod)
	p, err := r.toxi.Proxy(name)
	if err != nil {
		upstream := net.JoinHostPort(r.cfg.APIServerHost, r.cfg.APIServerPort)
		if p, err = r.toxi.CreateProxy(name, "127.0.0.1:0", upstream); err != nil {
			return "", "", fmt.Errorf("toxiproxy %s: %w", name, err)
		}
	}
	return net.SplitHostPort(p.Listen)
}

// dropAPIProxy removes a pod's API proxy once the pod is gone.
func (r *Runner) dropAPIProxy(ns, pod string) {
	if r.toxi == nil {
		return
	}
	if p, err := r.toxi.Proxy(fault.APIProxyName(ns, pod)); err == nil {
		if err := p.Delete(); err != nil {
			klog.Warningf("pod %s/%s: removing its API proxy: %v", ns, pod, err)
		}
	}
}

// orphan leaves the pod's processes running for good: no restart, no
// probes, its IP kept, its pids recorded for the harness and down.sh.
func (w *podWorker) orphan() {
	w.mu.Lock()
	ctrs := w.ctrs
	w.mu.Unlock()
	for _, c := range ctrs {
		c.mu.Lock()
		c.stopping = true
		pid, cancel := c.pid, c.cancel
		c.mu.Unlock()
		if cancel != nil {
			cancel()
		}
		if pid != 0 {
			f := fault.OrphanPidFile(w.r.cfg.StateDir, w.ns, w.name)
			if err := os.WriteFile(f, []byte(strconv.Itoa(pid)), 0o644); err != nil {
				w.logf("recording orphan pid: %v", err)
			}
			w.logf("orphaned: container %s (pid %d) keeps running, ip %s kept", c.spec.Name, pid, w.ip)
		}
	}
	w.keepIP = true
}

// orphaned reports whether the pod was ever seen with the orphan
// annotation (sticky: a deletion seen through a relist carries an older
// copy of the pod).
func (w *podWorker) orphaned() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.armed
}

// arm records the orphan annotation once it is seen, and tells the
// harness so through OrphanArmedFile. Called with the new pod object.
func (w *podWorker) arm(p *corev1.Pod) {
	if p.Annotations[fault.OrphanAnnotation] != "true" {
		return
	}
	w.mu.Lock()
	was := w.armed
	w.armed = true
	w.mu.Unlock()
	if !was {
		if err := os.WriteFile(fault.OrphanArmedFile(w.r.cfg.StateDir, w.ns, w.name), nil, 0o644); err != nil {
			w.logf("recording the orphan annotation: %v", err)
		}
	}
}
