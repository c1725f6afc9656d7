package podrunner

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// hostEnv are the only variables a container inherits from the machine, so
// that programs can be found and run; everything else comes from the pod.
var hostEnv = []string{"PATH", "LANG", "LC_ALL", "TMPDIR", "CARGO_HOME", "RUSTUP_HOME", "PYENV_ROOT"}

// containerEnv builds the process environment the way the kubelet does:
// envFrom, then env (fieldRef, secretKeyRef, configMapKeyRef, $(VAR)
// expansion), plus the service account credentials and the apiserver address.
func (r *Runner) containerEnv(ctx context.Context, p *corev1.Pod, c *corev1.Container, w *podWorker) ([]string, error) {
	vars := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := vars[k]; !ok {
			order = append(order, k)
		}
		vars[k] = v
	}
	for _, k := range hostEnv {
		if v, ok := os.LookupEnv(k); ok {
			set(k, v)
		}
	}
	set("HOSTNAME", p.Name)
	set("HOME", w.absDir())
	set("KUBERNETES_SERVICE_HOST", w.apiHost)
	set("KUBERNETES_SERVICE_PORT", w.apiPort)
	set("KUBECONFIG", filepath.Join(w.absDir(), "kubeconfig"))
	for _, ef := range c.EnvFrom {
		switch {
		case ef.ConfigMapRef != nil:
			cm, err := r.client.CoreV1().ConfigMaps(p.Namespace).Get(ctx, ef.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				if ef.ConfigMapRef.Optional != nil && *ef.ConfigMapRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom configMap %s: %w", ef.ConfigMapRef.Name, err)
			}
			for k, v := range cm.Data {
				set(ef.Prefix+k, v)
			}
		case ef.SecretRef != nil:
			s, err := r.client.CoreV1().Secrets(p.Namespace).Get(ctx, ef.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				if ef.SecretRef.Optional != nil && *ef.SecretRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom secret %s: %w", ef.SecretRef.Name, err)
			}
			for k, v := range s.Data {
				set(ef.Prefix+k, string(v))
			}
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			set(e.Name, expand(e.Value, vars))
			continue
		}
		v, err := r.envValue(ctx, p, c, w, e.ValueFrom)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		set(e.Name, v)
	}
	out := make([]string, 0, len(order))
	for _, k := range order {
		out = append(out, k+"="+vars[k])
	}
	return out, nil
}

func (r *Runner) envValue(ctx context.Context, p *corev1.Pod, c *corev1.Container, w *podWorker, src *corev1.EnvVarSource) (string, error) {
	switch {
	case src.FieldRef != nil:
		return fieldValue(p, w.ip, src.FieldRef.FieldPath)
	case src.SecretKeyRef != nil:
		ref := src.SecretKeyRef
		s, err := r.client.CoreV1().Secrets(p.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
		if err != nil {
			if ref.Optional != nil && *ref.Optional {
				return "", nil
			}
			return "", fmt.Errorf("secret %s: %w", ref.Name, err)
		}
		v, ok := s.Data[ref.Key]
		if !ok && (ref.Optional == nil || !*ref.Optional) {
			return "", fmt.Errorf("secret %s has no key %s", ref.Name, ref.Key)
		}
		return string(v), nil
	case src.ConfigMapKeyRef != nil:
		ref := src.ConfigMapKeyRef
		cm, err := r.client.CoreV1().ConfigMaps(p.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
		if err != nil {
			if ref.Optional != nil && *ref.Optional {
				return "", nil
			}
			return "", fmt.Errorf("configMap %s: %w", ref.Name, err)
		}
		v, ok := cm.Data[ref.Key]
		if !ok && (ref.Optional == nil || !*ref.Optional) {
			return "", fmt.Errorf("configMap %s has no key %s", ref.Name, ref.Key)
		}
		return v, nil
	case src.ResourceFieldRef != nil:
		res := src.ResourceFieldRef.Resource
		q, ok := c.Resources.Limits[corev1.ResourceName(strings.TrimPrefix(strings.TrimPrefix(res, "limits."), "requests."))]
		if strings.HasPrefix(res, "requests.") {
			q, ok = c.Resources.Requests[corev1.ResourceName(strings.TrimPrefix(res, "requests."))]
		}
		if !ok {
			return "0", nil
		}
		return q.String(), nil
	}
	return "", fmt.Errorf("unsupported valueFrom")
}

var labelRef = regexp.MustCompile(`^metadata\.(labels|annotations)\['([^']+)'\]$`)

func fieldValue(p *corev1.Pod, ip, path string) (string, error) {
	switch path {
	case "metadata.name":
		return p.Name, nil
	case "metadata.namespace":
		return p.Namespace, nil
	case "metadata.uid":
		return string(p.UID), nil
	case "spec.nodeName":
		return p.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return p.Spec.ServiceAccountName, nil
	case "status.podIP", "status.podIPs":
		return ip, nil
	case "status.hostIP", "status.hostIPs":
		return "127.0.0.1", nil
	}
	if m := labelRef.FindStringSubmatch(path); m != nil {
		if m[1] == "labels" {
			return p.Labels[m[2]], nil
		}
		return p.Annotations[m[2]], nil
	}
	return "", fmt.Errorf("unsupported fieldRef %q", path)
}

// expand replaces $(VAR) with the value of VAR when defined; $$ is a literal $.
func expand(s string, vars map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		if s[i+1] == '$' {
			b.WriteByte('$')
			i++
			continue
		}
		if s[i+1] == '(' {
			if end := strings.IndexByte(s[i+2:], ')'); end >= 0 {
				name := s[i+2 : i+2+end]
				if v, ok := vars[name]; ok {
					b.WriteString(v)
					i += end + 2
					continue
				}
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// imageName is an image reference's last path element without tag or digest.
func imageName(image string) string {
	if i := strings.IndexByte(image, '@'); i >= 0 {
		image = image[:i]
	}
	if i := strings.LastIndexByte(image, '/'); i >= 0 {
		image = image[i+1:]
	}
	if i := strings.IndexByte(image, ':'); i >= 0 {
		image = image[:i]
	}
	return image
}

// commandLine resolves what to execute. An image listed in the image map
// runs the mapped local binary as its entrypoint (a command naming the same
// program is pointed at it too); any other container must give a command,
// which runs as it is, found on PATH.
func (r *Runner) commandLine(c *corev1.Container, env []string) ([]string, error) {
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	var argv []string
	mapped, isMapped := r.cfg.ImageMap[imageName(c.Image)]
	switch {
	case len(c.Command) > 0:
		argv = append(argv, c.Command...)
		if isMapped && filepath.Base(argv[0]) == filepath.Base(mapped) {
			argv[0] = mapped
		}
	case isMapped:
		argv = []string{mapped}
	default:
		return nil, fmt.Errorf("image %q has no local binary (see --image-map) and the container gives no command", c.Image)
	}
	argv = append(argv, c.Args...)
	for i := range argv {
		argv[i] = expand(argv[i], vars)
	}
	if !strings.Contains(argv[0], "/") {
		path, err := exec.LookPath(argv[0])
		if err != nil {
			return nil, fmt.Errorf("command %q not found on PATH", argv[0])
		}
		argv[0] = path
	}
	return argv, nil
}
