package tests

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// The server reports the Kubernetes version pinned in e2e/go.mod.
func TestServerVersionIsPinned(t *testing.T) {
	gomod, err := os.ReadFile(filepath.Join(repoRoot(), "e2e", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`k8s\.io/kubernetes (v1\.\d+\.\d+)`).FindSubmatch(gomod)
	if m == nil {
		t.Fatal("e2e/go.mod does not pin k8s.io/kubernetes")
	}
	v, err := client(t).Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != string(m[1]) && !strings.HasPrefix(v.GitVersion, string(m[1])+"+") {
		t.Fatalf("server version %s, want %s", v.GitVersion, m[1])
	}
	// kubectl agrees.
	out, _, err := kubectl(t, "", "version", "-o", "json")
	if err != nil || !strings.Contains(out, string(m[1])) {
		t.Fatalf("kubectl version does not report %s: %v\n%s", m[1], err, out)
	}
}

func TestNodesReady(t *testing.T) {
	nodes, err := client(t).CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ready := 0
	for _, n := range nodes.Items {
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				ready++
			}
		}
	}
	if ready == 0 {
		t.Fatalf("no Ready node among %d", len(nodes.Items))
	}
}

// RBAC is enforced for ServiceAccounts: a Role grants exactly its verbs.
func TestServiceAccountRBAC(t *testing.T) {
	c := client(t)
	ctx := context.Background()
	ns := tempNamespace(t, c, "rbac")
	if _, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "reader"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "pod-reader"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "reader"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "pod-reader"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "reader", Namespace: ns}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	user := "system:serviceaccount:" + ns + ":reader"
	cases := []struct {
		verb, resource, namespace string
		want                      bool
	}{
		{"list", "pods", ns, true},
		{"get", "pods", ns, true},
		{"delete", "pods", ns, false},
		{"get", "secrets", ns, false},
		{"list", "pods", "default", false},
	}
	for _, tc := range cases {
		// RBAC caches refresh quickly but not instantly after the binding.
		eventually(t, 10*time.Second, fmt.Sprintf("%s %s in %s = %v", tc.verb, tc.resource, tc.namespace, tc.want), func() (bool, error) {
			sar, err := c.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
				User:               user,
				Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
				ResourceAttributes: &authzv1.ResourceAttributes{Namespace: tc.namespace, Verb: tc.verb, Resource: tc.resource},
			}}, metav1.CreateOptions{})
			if err != nil {
				return false, err
			}
			return sar.Status.Allowed == tc.want, nil
		})
		out, _, _ := kubectl(t, "", "auth", "can-i", tc.verb, tc.resource, "-n", tc.namespace, "--as", user)
		if got := strings.TrimSpace(out) == "yes"; got != tc.want {
			t.Errorf("kubectl auth can-i %s %s -n %s --as %s: %q, want %v", tc.verb, tc.resource, tc.namespace, user, strings.TrimSpace(out), tc.want)
		}
	}
}

func httpServerDeployment(name, rev string) *appsv1.Deployment {
	one := int32(1)
	surge, unavail := intstr.FromInt32(1), intstr.FromInt32(0)
	grace := int64(5)
	labels := map[string]string{"app": name}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DeploymentSpec{
			Replicas: &one,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Strategy: appsv1.DeploymentStrategy{
				Type:          appsv1.RollingUpdateDeploymentStrategyType,
				RollingUpdate: &appsv1.RollingUpdateDeployment{MaxSurge: &surge, MaxUnavailable: &unavail},
			},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: &grace,
					Containers: []corev1.Container{{
						Name:    "web",
						Image:   "python:3.11",
						Command: []string{"python3", "-m", "http.server", "8080", "--bind", "$(POD_IP)"},
						Env: []corev1.EnvVar{
							{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
							{Name: "REV", Value: rev},
						},
						Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromString("http")}},
							PeriodSeconds: 1,
						},
					}},
				},
			},
		},
	}
}

func podReadySince(p *corev1.Pod) (time.Time, bool) {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return c.LastTransitionTime.Time, true
		}
	}
	return time.Time{}, false
}

func containerPid(p *corev1.Pod) int {
	for _, cs := range p.Status.ContainerStatuses {
		if pid, err := strconv.Atoi(strings.TrimPrefix(cs.ContainerID, "localkube://")); err == nil {
			return pid
		}
	}
	return 0
}

func processAlive(pid int) bool {
	return pid > 0 && syscall.Kill(pid, 0) == nil
}

func getPage(ip string) (string, error) {
	hc := http.Client{Timeout: 2 * time.Second}
	resp, err := hc.Get("http://" + ip + ":8080/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func readyPods(t *testing.T, c kubernetes.Interface, ns, app string) []corev1.Pod {
	pods, err := c.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: "app=" + app})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Pod
	for _, p := range pods.Items {
		if _, ok := podReadySince(&p); ok && p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out
}

// A Deployment runs as a local process on its pod IP, becomes Ready through
// its readiness probe, rolls with maxSurge 1 / maxUnavailable 0 (new process
// Ready before the old one is stopped), and its processes stop when the
// Deployment is deleted (garbage collection of ReplicaSets and pods).
func TestDeploymentLifecycle(t *testing.T) {
	c := client(t)
	ctx := context.Background()
	ns := tempNamespace(t, c, "deploy")
	d, err := c.AppsV1().Deployments(ns).Create(ctx, httpServerDeployment("web", "1"), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var first corev1.Pod
	eventually(t, 60*time.Second, "first pod Ready", func() (bool, error) {
		pods := readyPods(t, c, ns, "web")
		if len(pods) == 1 {
			first = pods[0]
			return true, nil
		}
		return false, nil
	})
	if !strings.HasPrefix(first.Status.PodIP, "127.") || first.Status.PodIP == "127.0.0.1" {
		t.Fatalf("pod IP %q is not a pod-private loopback address", first.Status.PodIP)
	}
	if first.Status.Phase != corev1.PodRunning {
		t.Fatalf("phase %s, want Running", first.Status.Phase)
	}
	page, err := getPage(first.Status.PodIP)
	if err != nil || !strings.Contains(page, "Directory listing") {
		t.Fatalf("page on %s: %v %q", first.Status.PodIP, err, page)
	}
	oldPid := containerPid(&first)
	if !processAlive(oldPid) {
		t.Fatalf("first pod's process %d is not running", oldPid)
	}

	// Roll: change an env value. Watch the pods until the rollout is done.
	d, err = c.AppsV1().Deployments(ns).Get(ctx, d.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d.Spec.Template.Spec.Containers[0].Env[1].Value = "2"
	if _, err := c.AppsV1().Deployments(ns).Update(ctx, d, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var second corev1.Pod
	oldDeletedAt := time.Time{}
	violation := ""
	eventually(t, 90*time.Second, "rollout to the new pod, old process stopped", func() (bool, error) {
		pods, err := c.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, err
		}
		// First the new pod (in any list position), then the old one.
		for _, p := range pods.Items {
			if p.UID != first.UID {
				if _, ok := podReadySince(&p); ok {
					second = p
				}
			}
		}
		for _, p := range pods.Items {
			if p.UID == first.UID && p.DeletionTimestamp != nil && oldDeletedAt.IsZero() {
				oldDeletedAt = p.DeletionTimestamp.Time
			}
			// While the old process runs, the new one may not be missing:
			// maxUnavailable 0 means the old pod is only stopped once the new
			// one is Ready.
			if p.UID == first.UID && p.DeletionTimestamp != nil && second.UID == "" {
				violation = "old pod deleted before a new pod was Ready"
			}
		}
		return second.UID != "" && !processAlive(oldPid), nil
	})
	if violation != "" {
		t.Fatal(violation)
	}
	readyAt, _ := podReadySince(&second)
	if !oldDeletedAt.IsZero() && oldDeletedAt.Before(readyAt.Add(-time.Second)) {
		t.Fatalf("old pod deleted at %s, before the new pod was Ready at %s", oldDeletedAt, readyAt)
	}
	if page, err := getPage(second.Status.PodIP); err != nil || !strings.Contains(page, "Directory listing") {
		t.Fatalf("new pod's page: %v", err)
	}
	if second.Status.PodIP != first.Status.PodIP {
		if _, err := getPage(first.Status.PodIP); err == nil {
			t.Fatalf("old pod IP %s still answers after the rollout", first.Status.PodIP)
		}
	}
	newPid := containerPid(&second)

	// Delete the Deployment: the garbage collector removes the ReplicaSets
	// and the pods, and the pod runner stops the process.
	bg := metav1.DeletePropagationBackground
	if err := c.AppsV1().Deployments(ns).Delete(ctx, "web", metav1.DeleteOptions{PropagationPolicy: &bg}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "pods gone and process stopped after deleting the Deployment", func() (bool, error) {
		pods, err := c.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, err
		}
		rs, err := c.AppsV1().ReplicaSets(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, err
		}
		return len(pods.Items) == 0 && len(rs.Items) == 0 && !processAlive(newPid), nil
	})
}

// Deletion sends SIGTERM, then SIGKILL after the grace period, like the
// kubelet: a process that ignores SIGTERM is killed after its grace.
func TestGracePeriodThenKill(t *testing.T) {
	c := client(t)
	ctx := context.Background()
	ns := tempNamespace(t, c, "grace")
	grace := int64(2)
	p, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "stubborn"},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name: "sh", Image: "busybox",
				Command: []string{"sh", "-c", "trap 'echo got TERM' TERM; while true; do sleep 0.2; done"},
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	eventually(t, 60*time.Second, "pod running", func() (bool, error) {
		p, err = c.CoreV1().Pods(ns).Get(ctx, "stubborn", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		pid = containerPid(p)
		return processAlive(pid), nil
	})
	start := time.Now()
	if err := c.CoreV1().Pods(ns).Delete(ctx, "stubborn", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "process killed and pod removed", func() (bool, error) {
		_, err := c.CoreV1().Pods(ns).Get(ctx, "stubborn", metav1.GetOptions{})
		return !processAlive(pid) && apierrors.IsNotFound(err), nil
	})
	took := time.Since(start)
	if took < time.Duration(grace)*time.Second {
		t.Fatalf("a process that ignores SIGTERM stopped after %s, before its %ds grace period", took, grace)
	}
	logPath := filepath.Join(stateDir(), "logs", ns+"_stubborn.log")
	if b, err := os.ReadFile(logPath); err == nil && !strings.Contains(string(b), "got TERM") {
		t.Errorf("the process did not receive SIGTERM first (log %s):\n%s", logPath, b)
	}
}

// A process that exits fails the pod (restartPolicy Never) or is restarted
// (restartPolicy Always).
func TestRestartPolicy(t *testing.T) {
	c := client(t)
	ctx := context.Background()
	ns := tempNamespace(t, c, "restart")
	mk := func(name string, policy corev1.RestartPolicy) {
		if _, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{
				RestartPolicy: policy,
				Containers:    []corev1.Container{{Name: "c", Image: "busybox", Command: []string{"sh", "-c", "exit 3"}}},
			},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mk("never", corev1.RestartPolicyNever)
	mk("always", corev1.RestartPolicyAlways)
	eventually(t, 60*time.Second, "restartPolicy Never: pod Failed with exit code 3", func() (bool, error) {
		p, err := c.CoreV1().Pods(ns).Get(ctx, "never", metav1.GetOptions{})
		if err != nil || p.Status.Phase != corev1.PodFailed || len(p.Status.ContainerStatuses) == 0 {
			return false, err
		}
		term := p.Status.ContainerStatuses[0].State.Terminated
		return term != nil && term.ExitCode == 3, nil
	})
	eventually(t, 60*time.Second, "restartPolicy Always: container restarted", func() (bool, error) {
		p, err := c.CoreV1().Pods(ns).Get(ctx, "always", metav1.GetOptions{})
		if err != nil || len(p.Status.ContainerStatuses) == 0 {
			return false, err
		}
		return p.Status.ContainerStatuses[0].RestartCount >= 2, nil
	})
}
