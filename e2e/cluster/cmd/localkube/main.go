// Command localkube runs the pieces of the local Kubernetes cluster used by
// shardpool's end-to-end tests: one binary, one role per process, so that
// e2e/up.sh can start, track (by pid) and stop each of them on its own.
//
//	localkube etcd --data-dir DIR --client-port N --peer-port N
//	localkube apiserver [kube-apiserver flags]
//	localkube controller-manager [kube-controller-manager flags]
//	localkube scheduler [kube-scheduler flags]
//	localkube kwok [kwok flags]
//	localkube podrunner --kubeconfig F --state DIR ...
//	localkube toxiproxy --host 127.0.0.1 --port N   (the TCP fault proxy)
//	localkube pki --dir DIR --apiserver-port N
//	localkube freeport PORT   (exit 1 with a message if PORT is taken)
package main

import (
	"fmt"
	"net"
	"os"
	"strconv"

	_ "time/tzdata"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"

	"shardpool.dev/e2e/cluster/internal/etcd"
	"shardpool.dev/e2e/cluster/internal/kwok"
	"shardpool.dev/e2e/cluster/internal/pki"
	"shardpool.dev/e2e/cluster/internal/podrunner"
	"shardpool.dev/e2e/cluster/internal/toxi"
)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: localkube etcd|apiserver|controller-manager|scheduler|kwok|podrunner|toxiproxy|pki|freeport [flags]")
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	role, args := os.Args[1], os.Args[2:]
	switch role {
	case "etcd":
		os.Exit(etcd.Main(args))
	case "apiserver":
		c := apiserver.NewAPIServerCommand()
		c.SetArgs(args)
		os.Exit(cli.Run(c))
	case "controller-manager":
		c := controllermanager.NewControllerManagerCommand()
		c.SetArgs(args)
		os.Exit(cli.Run(c))
	case "scheduler":
		c := scheduler.NewSchedulerCommand()
		c.SetArgs(args)
		os.Exit(cli.Run(c))
	case "kwok":
		os.Exit(kwok.Main(args))
	case "podrunner":
		os.Exit(podrunner.Main(args))
	case "toxiproxy":
		os.Exit(toxi.Main(args))
	case "pki":
		os.Exit(pki.Main(args))
	case "freeport":
		os.Exit(freeport(args))
	default:
		usage()
	}
}

// freeport exits 0 when every given loopback port can be bound, 1 otherwise,
// naming the port that is taken.
func freeport(args []string) int {
	for _, a := range args {
		p, err := strconv.Atoi(a)
		if err != nil || p <= 0 || p > 65535 {
			fmt.Fprintf(os.Stderr, "freeport: %q is not a port\n", a)
			return 2
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", a))
		if err != nil {
			fmt.Fprintf(os.Stderr, "port %d on 127.0.0.1 is already taken (%v)\n", p, err)
			return 1
		}
		_ = l.Close()
	}
	return 0
}
