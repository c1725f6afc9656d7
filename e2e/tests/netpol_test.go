package tests

import (
	"context"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// The chart's NetworkPolicies, evaluated against the release's live pods:
// the shard policy selects every shard pod and nothing else, and its data
// port (6432) admits the router pods and no other pod of the release (not
// a shard, not the operator); metrics stay reachable. The local cluster
// runs pods as processes with no network plugin, so nothing enforces the
// policies here: this proves what they say, a plugin that enforces
// NetworkPolicy (Calico, Cilium) does the rest.
func TestNetworkPolicyAdmitsOnlyRoutersToShards(t *testing.T) {
	installed(t)
	c := client(t)
	ctx := context.Background()
	np, err := c.NetworkingV1().NetworkPolicies(systemNS).Get(ctx, "shardpool-shard", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the chart's shard NetworkPolicy: %v", err)
	}
	pods, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=shardpool"})
	if err != nil {
		t.Fatal(err)
	}
	selects := func(sel *metav1.LabelSelector, p corev1.Pod) bool {
		s, err := metav1.LabelSelectorAsSelector(sel)
		if err != nil {
			t.Fatalf("selector %v: %v", sel, err)
		}
		return s.Matches(labels.Set(p.Labels))
	}
	// admits: whether a rule for `port` lets pod p (same namespace) in.
	admits := func(port int32, p corev1.Pod) bool {
		for _, rule := range np.Spec.Ingress {
			covers := len(rule.Ports) == 0
			for _, rp := range rule.Ports {
				if rp.Port != nil && rp.Port.IntVal == port {
					covers = true
				}
			}
			if !covers {
				continue
			}
			if len(rule.From) == 0 {
				return true
			}
			for _, peer := range rule.From {
				if peer.PodSelector != nil && peer.NamespaceSelector == nil && peer.IPBlock == nil && selects(peer.PodSelector, p) {
					return true
				}
			}
		}
		return false
	}
	if len(np.Spec.PolicyTypes) != 1 || np.Spec.PolicyTypes[0] != networkingv1.PolicyTypeIngress {
		t.Errorf("policy types %v, want [Ingress]", np.Spec.PolicyTypes)
	}
	var shards, routers, others int
	for _, p := range pods.Items {
		component := p.Labels["app.kubernetes.io/component"]
		selected := selects(&np.Spec.PodSelector, p)
		in := admits(6432, p)
		switch component {
		case "shard":
			shards++
			if !selected {
				t.Errorf("shard pod %s is not selected by the policy (labels %v)", p.Name, p.Labels)
			}
			if in {
				t.Errorf("shard pod %s may reach another shard's data port", p.Name)
			}
		case "router":
			routers++
			if selected {
				t.Errorf("router pod %s is selected by the shard policy", p.Name)
			}
			if !in {
				t.Errorf("router pod %s may not reach the shards' data port", p.Name)
			}
		default:
			others++
			if selected || in {
				t.Errorf("%s pod %s: selected=%v, admitted to 6432=%v; want neither", component, p.Name, selected, in)
			}
		}
		if !admits(9090, p) {
			t.Errorf("pod %s may not reach the shards' metrics port (no metricsNamespace set: anyone may)", p.Name)
		}
	}
	if shards == 0 || routers == 0 || others == 0 {
		t.Fatalf("pods seen: %d shards, %d routers, %d others; want each", shards, routers, others)
	}
	// A pod of another namespace (any tenant workload) is not admitted:
	// the only peer of the data port is a podSelector, which matches in the
	// policy's own namespace only.
	for _, rule := range np.Spec.Ingress {
		for _, rp := range rule.Ports {
			if rp.Port != nil && rp.Port.IntVal == 6432 {
				for _, peer := range rule.From {
					if peer.NamespaceSelector != nil || peer.IPBlock != nil {
						t.Errorf("the data port admits a namespace or address range: %+v", peer)
					}
				}
				if len(rule.From) == 0 {
					t.Errorf("the data port admits anyone")
				}
			}
		}
	}
	t.Logf("shard NetworkPolicy: %d shard pods selected; data port admits %d router pods and none of %d other pods", shards, routers, others)
}
