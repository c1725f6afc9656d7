// Package kwok runs the kwok controller, which keeps the local cluster's fake
// nodes Ready (status, heartbeats, leases). Pod status is not its business:
// the pod runner plays kubelet, so kwok is given a pod stage that never
// matches and therefore never touches a pod.
package kwok

import (
	"os"

	"github.com/spf13/pflag"

	"sigs.k8s.io/kwok/pkg/config"
	"sigs.k8s.io/kwok/pkg/kwok/cmd"
	"sigs.k8s.io/kwok/pkg/log"
	"sigs.k8s.io/kwok/pkg/utils/signals"
)

// Main runs kwok with the given flags and returns the exit code.
func Main(args []string) int {
	// The Kubernetes packages linked into this binary declare a non-bool
	// --version flag on the global flag set at init; kwok's cobra command
	// would trip over it, and in this process only kwok runs.
	pflag.CommandLine = pflag.NewFlagSet("kwok", pflag.ContinueOnError)
	flagset := pflag.NewFlagSet("global", pflag.ContinueOnError)
	flagset.ParseErrorsWhitelist.UnknownFlags = true
	flagset.Usage = func() {}
	os.Args = append([]string{"kwok"}, args...)

	ctx := signals.SetupSignalContext()
	ctx, logger := log.InitFlags(ctx, flagset)
	ctx, err := config.InitFlags(ctx, flagset)
	if err != nil {
		logger.Error("kwok: config flags", err)
		return 1
	}
	command := cmd.NewCommand(ctx)
	command.PersistentFlags().AddFlagSet(flagset)
	command.SetArgs(args)
	if err := command.ExecuteContext(ctx); err != nil {
		logger.Error("kwok: exit", err)
		return 1
	}
	return 0
}
