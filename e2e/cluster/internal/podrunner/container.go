package podrunner

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// container runs one container of a pod as a local process group and keeps
// it running per the pod's restartPolicy.
type container struct {
	w    *podWorker
	spec corev1.Container
	// policy is the pod's restartPolicy.
	policy corev1.RestartPolicy

	// mu guards every field below; the loop writes them, status() reads them.
	mu        sync.Mutex
	pid       int
	exited    chan struct{}
	startedAt time.Time
	ready     bool
	restarts  int32
	waiting   string
	waitMsg   string
	lastTerm  *corev1.ContainerStateTerminated
	finalTerm *corev1.ContainerStateTerminated
	// stopping is set once the pod is being torn down: no more restarts.
	stopping bool
	// cancel stops the loop's waits (backoff, probes).
	cancel context.CancelFunc
	// done is closed when loop returns.
	done chan struct{}
}

func newContainer(w *podWorker, p *corev1.Pod, spec *corev1.Container) *container {
	return &container{w: w, spec: *spec, policy: p.Spec.RestartPolicy, waiting: "ContainerCreating", done: make(chan struct{})}
}

func (c *container) status() corev1.ContainerStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	cs := corev1.ContainerStatus{
		Name:         c.spec.Name,
		Image:        c.spec.Image,
		ImageID:      "localkube://" + c.spec.Image,
		Ready:        c.ready,
		RestartCount: c.restarts,
	}
	started := c.pid != 0
	cs.Started = &started
	switch {
	case c.pid != 0:
		cs.ContainerID = fmt.Sprintf("localkube://%d", c.pid)
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(c.startedAt)}
	case c.finalTerm != nil:
		cs.State.Terminated = c.finalTerm.DeepCopy()
	default:
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: c.waiting, Message: c.waitMsg}
	}
	if c.lastTerm != nil {
		cs.LastTerminationState.Terminated = c.lastTerm.DeepCopy()
	}
	return cs
}

func (c *container) set(f func()) {
	c.mu.Lock()
	f()
	c.mu.Unlock()
	c.w.wake()
}

// loop starts the process, waits for it and restarts it per restartPolicy
// with exponential backoff (1s doubling to 30s, reset after 60s of running).
func (c *container) loop(parent context.Context) {
	defer close(c.done)
	ctx, cancel := context.WithCancel(parent)
	c.mu.Lock()
	c.cancel = cancel
	stopping := c.stopping
	c.mu.Unlock()
	defer cancel()
	if stopping {
		return
	}
	backoff := time.Second
	for {
		started := time.Now()
		exited, err := c.start()
		if err != nil {
			c.w.logf("container %s: %v", c.spec.Name, err)
			c.set(func() { c.waiting, c.waitMsg = "StartError", err.Error() })
		} else {
			probeCtx, stopProbes := context.WithCancel(ctx)
			go c.probe(probeCtx, c.spec.ReadinessProbe, true)
			go c.probe(probeCtx, c.spec.LivenessProbe, false)
			if c.spec.ReadinessProbe == nil {
				c.set(func() { c.ready = true })
			}
			<-exited
			stopProbes()
		}
		c.mu.Lock()
		term := c.lastTerm
		stopping := c.stopping
		c.mu.Unlock()
		if stopping {
			return
		}
		restart := c.policy == corev1.RestartPolicyAlways || c.policy == "" ||
			(c.policy == corev1.RestartPolicyOnFailure && (term == nil || term.ExitCode != 0))
		if !restart && err == nil {
			c.set(func() { c.finalTerm = term })
			return
		}
		if time.Since(started) > time.Minute {
			backoff = time.Second
		}
		c.set(func() {
			c.waiting, c.waitMsg = "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container", backoff)
		})
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		if backoff *= 2; backoff > 30*time.Second {
			backoff = 30 * time.Second
		}
		c.set(func() { c.restarts++ })
	}
}

// start launches the process in its own process group; the returned channel
// is closed when it has exited and its state was recorded.
func (c *container) start() (chan struct{}, error) {
	p := c.w.current()
	env, err := c.w.r.containerEnv(context.Background(), p, &c.spec, c.w)
	if err != nil {
		return nil, err
	}
	argv, err := c.w.r.commandLine(&c.spec, env)
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(c.w.r.cfg.StateDir, "logs", fmt.Sprintf("%s_%s.log", c.w.ns, c.w.name))
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(logf, "--- %s container %s starting: %s\n", time.Now().Format(time.RFC3339), c.spec.Name, strings.Join(argv, " "))
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.w.absDir()
	if c.spec.WorkingDir != "" {
		if st, err := os.Stat(c.spec.WorkingDir); err == nil && st.IsDir() {
			cmd.Dir = c.spec.WorkingDir
		}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	pid := cmd.Process.Pid
	pidFile := filepath.Join(c.w.dir, c.spec.Name+".pid")
	_ = os.WriteFile(pidFile, []byte(strconv.Itoa(pid)), 0o644)
	exited := make(chan struct{})
	c.mu.Lock()
	if c.stopping {
		// Torn down while starting: do not leave this process behind.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	c.mu.Unlock()
	c.set(func() {
		c.pid, c.exited, c.startedAt, c.ready, c.waiting, c.waitMsg = pid, exited, time.Now(), false, "", ""
	})
	c.w.logf("container %s started, pid %d, ip %s", c.spec.Name, pid, c.w.ip)
	go func() {
		werr := cmd.Wait()
		// The group may still hold children; they go with their leader.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = os.Remove(pidFile)
		code, reason := 0, "Completed"
		if werr != nil {
			code, reason = 1, "Error"
			if ee, ok := werr.(*exec.ExitError); ok {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					code = 128 + int(ws.Signal())
				} else {
					code = ee.ExitCode()
				}
			}
		}
		fmt.Fprintf(logf, "--- %s container %s exited with code %d\n", time.Now().Format(time.RFC3339), c.spec.Name, code)
		logf.Close()
		c.w.logf("container %s (pid %d) exited with code %d", c.spec.Name, pid, code)
		c.set(func() {
			c.pid, c.ready = 0, false
			c.lastTerm = &corev1.ContainerStateTerminated{
				ExitCode: int32(code), Reason: reason,
				StartedAt: metav1.NewTime(c.startedAt), FinishedAt: metav1.Now(),
				ContainerID: fmt.Sprintf("localkube://%d", pid),
			}
		})
		close(exited)
	}()
	return exited, nil
}

// stop ends the container for good: SIGTERM to its process group, SIGKILL
// after grace, and no restart.
func (c *container) stop(grace time.Duration) {
	c.mu.Lock()
	c.stopping = true
	pid, exited, cancel := c.pid, c.exited, c.cancel
	c.mu.Unlock()
	if pid != 0 && exited != nil {
		c.kill(pid, exited, grace)
	}
	if cancel != nil {
		cancel()
	}
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
	}
}

// kill sends SIGTERM, then SIGKILL after grace, and waits for the exit.
func (c *container) kill(pid int, exited chan struct{}, grace time.Duration) {
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-exited:
		return
	case <-time.After(grace):
	}
	c.w.logf("container %s (pid %d) still running after %s grace; SIGKILL", c.spec.Name, pid, grace)
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	<-exited
}
