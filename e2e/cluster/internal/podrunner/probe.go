package podrunner

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probe runs a readiness (ready=true) or liveness probe until ctx ends.
// Readiness failures mark the container unready; liveness failures stop the
// process so that the restart policy applies.
func (c *container) probe(ctx context.Context, p *corev1.Probe, readiness bool) {
	if p == nil {
		return
	}
	period := time.Duration(max32(p.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max32(p.TimeoutSeconds, 1)) * time.Second
	failThreshold := int(max32(p.FailureThreshold, 3))
	successThreshold := int(max32(p.SuccessThreshold, 1))
	select {
	case <-time.After(time.Duration(p.InitialDelaySeconds) * time.Second):
	case <-ctx.Done():
		return
	}
	successes, failures := 0, 0
	for {
		err := c.probeOnce(ctx, p, timeout)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			successes, failures = successes+1, 0
		} else {
			successes, failures = 0, failures+1
		}
		if readiness {
			c.mu.Lock()
			cur := c.ready
			c.mu.Unlock()
			if !cur && successes >= successThreshold {
				c.set(func() { c.ready = true })
			} else if cur && failures >= failThreshold {
				c.w.logf("container %s readiness probe failed: %v", c.spec.Name, err)
				c.set(func() { c.ready = false })
			}
		} else if failures >= failThreshold {
			c.w.logf("container %s liveness probe failed %d times: %v; restarting", c.spec.Name, failures, err)
			c.mu.Lock()
			pid, exited := c.pid, c.exited
			c.mu.Unlock()
			if pid != 0 {
				// The probe's own grace period wins over the pod's, as
				// in the kubelet (a wedged process cannot drain anyway).
				grace := int64(30)
				if sp := c.w.current().Spec.TerminationGracePeriodSeconds; sp != nil {
					grace = *sp
				}
				if p.TerminationGracePeriodSeconds != nil {
					grace = *p.TerminationGracePeriodSeconds
				}
				c.kill(pid, exited, time.Duration(grace)*time.Second)
			}
			return
		}
		select {
		case <-time.After(period):
		case <-ctx.Done():
			return
		}
	}
}

func max32(v, min int32) int32 {
	if v < min {
		return min
	}
	return v
}

func (c *container) resolvePort(p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.spec.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return strconv.Atoi(p.StrVal)
}

func (c *container) probeOnce(ctx context.Context, p *corev1.Probe, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		port, err := c.resolvePort(p.HTTPGet.Port)
		if err != nil {
			return err
		}
		host := p.HTTPGet.Host
		if host == "" {
			host = c.w.ip
		}
		scheme := "http"
		if p.HTTPGet.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		url := fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), p.HTTPGet.Path)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		for _, h := range p.HTTPGet.HTTPHeaders {
			req.Header.Add(h.Name, h.Value)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return nil
	case p.TCPSocket != nil:
		port, err := c.resolvePort(p.TCPSocket.Port)
		if err != nil {
			return err
		}
		host := p.TCPSocket.Host
		if host == "" {
			host = c.w.ip
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case p.Exec != nil && len(p.Exec.Command) > 0:
		return exec.CommandContext(ctx, p.Exec.Command[0], p.Exec.Command[1:]...).Run()
	}
	return fmt.Errorf("unsupported probe")
}
