// Package toxi runs Shopify's toxiproxy server inside localkube: the TCP
// fault proxy of the local cluster. The pod runner gives every pod its own
// proxy to the API server, and tests put proxies in front of the warehouse;
// e2e/fault drives them through toxiproxy's HTTP API.
package toxi

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Main serves toxiproxy's API on --host:--port until SIGTERM or SIGINT.
func Main(args []string) int {
	fs := flag.NewFlagSet("toxiproxy", flag.ContinueOnError)
	host := fs.String("host", "127.0.0.1", "address of the API")
	port := fs.String("port", "16474", "port of the API")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	logger := zerolog.New(os.Stdout).With().Timestamp().Logger().Level(zerolog.InfoLevel)
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), logger)
	addr := net.JoinHostPort(*host, *port)
	failed := make(chan error, 1)
	go func() { failed <- server.Listen(addr) }()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case err := <-failed:
		fmt.Fprintf(os.Stderr, "toxiproxy: %v\n", err)
		return 1
	case <-signals:
	}
	if err := server.Shutdown(); err != nil {
		fmt.Fprintf(os.Stderr, "toxiproxy: shutdown: %v\n", err)
	}
	return 0
}
