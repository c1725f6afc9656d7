// Package podrunner is the kubelet of the local cluster's fake nodes: it
// watches the pods bound to them, runs each container as a local process on
// the pod's own loopback IP, reports pod status and probe-driven readiness
// through the pods/status subresource, and stops processes on deletion with
// SIGTERM, then SIGKILL after the grace period.
package podrunner

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2/client"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

// Config is what the runner needs to know about the cluster and the machine.
type Config struct {
	// Nodes whose pods this runner runs.
	Nodes map[string]bool
	// StateDir holds per-pod directories (token, kubeconfig, pid files) and logs/.
	StateDir string
	// APIServerHost/Port are given to pods as KUBERNETES_SERVICE_HOST/PORT and in their kubeconfig.
	APIServerHost string
	APIServerPort string
	// CAFile is the cluster CA given to pods.
	CAFile string
	// ImageMap maps an image name (last path element, no tag) to a local binary.
	ImageMap map[string]string
	// IPPrefix is the first two octets of pod IPs, e.g. "127.1".
	IPPrefix string
	// Toxiproxy is the URL of the cluster's toxiproxy API; when set, every
	// pod reaches the API server through a proxy of its own.
	Toxiproxy string
}

// Runner owns one worker per pod.
type Runner struct {
	cfg    Config
	client kubernetes.Interface
	ips    *ipAllocator
	// mu guards workers; held only to look up, add or remove entries.
	mu      sync.Mutex
	workers map[types.UID]*podWorker
	// wg counts live workers, so shutdown can wait for their processes.
	wg sync.WaitGroup
	// toxi is the toxiproxy client (nil without one).
	toxi *toxiproxy.Client
}

// Main parses flags, runs the runner until SIGTERM/SIGINT, then stops every
// container it started.
func Main(args []string) int {
	fs := flag.NewFlagSet("podrunner", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	nodes := fs.String("nodes", "", "comma-separated node names to run pods for")
	state := fs.String("state", "", "state directory")
	apiHost := fs.String("apiserver-host", "127.0.0.1", "apiserver address given to pods")
	apiPort := fs.String("apiserver-port", "16443", "apiserver port given to pods")
	caFile := fs.String("ca-file", "", "cluster CA certificate given to pods")
	imageMap := fs.String("image-map", "", "comma-separated image=binary pairs")
	ipPrefix := fs.String("ip-prefix", "127.1", "first two octets of pod IPs")
	toxi := fs.String("toxiproxy", "", "toxiproxy API URL: give each pod its own proxy to the API server")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *kubeconfig == "" || *nodes == "" || *state == "" || *caFile == "" {
		fmt.Fprintln(os.Stderr, "podrunner: --kubeconfig, --nodes, --state and --ca-file are required")
		return 2
	}
	cfg := Config{
		Nodes:         map[string]bool{},
		StateDir:      *state,
		APIServerHost: *apiHost,
		APIServerPort: *apiPort,
		CAFile:        *caFile,
		ImageMap:      map[string]string{},
		IPPrefix:      *ipPrefix,
		Toxiproxy:     *toxi,
	}
	for _, n := range strings.Split(*nodes, ",") {
		if n = strings.TrimSpace(n); n != "" {
			cfg.Nodes[n] = true
		}
	}
	for _, kv := range strings.Split(*imageMap, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "podrunner: --image-map entry %q is not image=binary\n", kv)
			return 2
		}
		abs, err := filepath.Abs(v)
		if err != nil {
			fmt.Fprintf(os.Stderr, "podrunner: %v\n", err)
			return 2
		}
		cfg.ImageMap[k] = abs
	}
	rc, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "podrunner: kubeconfig: %v\n", err)
		return 1
	}
	rc.QPS, rc.Burst = 50, 100
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		fmt.Fprintf(os.Stderr, "podrunner: client: %v\n", err)
		return 1
	}
	for _, d := range []string{filepath.Join(cfg.StateDir, "pods"), filepath.Join(cfg.StateDir, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "podrunner: %v\n", err)
			return 1
		}
	}
	killLeftovers(filepath.Join(cfg.StateDir, "pods"))

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	r := &Runner{cfg: cfg, client: client, ips: newIPAllocator(cfg.IPPrefix), workers: map[types.UID]*podWorker{}}
	if cfg.Toxiproxy != "" {
		r.toxi = toxiproxy.NewClient(cfg.Toxiproxy)
	}
	r.run(ctx)
	klog.Info("podrunner: stopping all containers")
	r.stopAll()
	return 0
}

func (r *Runner) run(ctx context.Context) {
	factory := informers.NewSharedInformerFactory(r.client, 10*time.Minute)
	inf := factory.Core().V1().Pods().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o interface{}) { r.observe(o) },
		UpdateFunc: func(_, o interface{}) { r.observe(o) },
		DeleteFunc: func(o interface{}) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			if p, ok := o.(*corev1.Pod); ok {
				r.mu.Lock()
				w := r.workers[p.UID]
				r.mu.Unlock()
				if w != nil {
					// The final state first: an annotation set just before
					// the deletion (an orphaning) may not have arrived yet.
					w.update(p)
					w.gone()
				}
			}
		},
	})
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	klog.Info("podrunner: watching pods")
	<-ctx.Done()
}

// observe hands the newest version of a pod to its worker, creating one for
// a pod newly bound to a managed node.
func (r *Runner) observe(o interface{}) {
	p, ok := o.(*corev1.Pod)
	if !ok || !r.cfg.Nodes[p.Spec.NodeName] {
		return
	}
	r.mu.Lock()
	w := r.workers[p.UID]
	if w == nil {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			r.mu.Unlock()
			return
		}
		w = newPodWorker(r, p)
		r.workers[p.UID] = w
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			w.run()
			r.mu.Lock()
			delete(r.workers, p.UID)
			r.mu.Unlock()
		}()
	}
	r.mu.Unlock()
	w.update(p)
}

func (r *Runner) stopAll() {
	r.mu.Lock()
	for _, w := range r.workers {
		w.shutdown()
	}
	r.mu.Unlock()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(40 * time.Second):
		klog.Warning("podrunner: some containers did not stop in 40s")
	}
}
