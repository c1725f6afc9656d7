package fault

import (
	"fmt"
	"path/filepath"
)

// OrphanAnnotation on a pod makes its deletion leave its processes running,
// as when a node is cut off from the control plane: the pod object goes,
// a replacement starts elsewhere, and the old process carries on with its
// network (its pod IP stays taken) until Orphan.Kill ends it by the pid
// the pod runner recorded in OrphanPidFile.
const OrphanAnnotation = "localkube.shardpool.dev/orphan"

// APIProxyName is the name of the toxiproxy proxy that carries one pod's
// traffic to the API server, so a test can cut or blackhole that pod alone.
func APIProxyName(ns, pod string) string {
	return "api-" + ns + "-" + pod
}

// OrphanPidFile is where the pod runner records the pid of an orphaned
// pod's process group (e2e/down.sh kills what it finds there).
func OrphanPidFile(state, ns, pod string) string {
	return filepath.Join(state, "pids", fmt.Sprintf("orphan-%s_%s.pid", ns, pod))
}

// OrphanArmedFile is written by the pod runner once it has seen a pod's
// OrphanAnnotation; the harness deletes the pod only after that, so the
// deletion cannot race the annotation through the runner's watch.
func OrphanArmedFile(state, ns, pod string) string {
	return filepath.Join(state, "pids", fmt.Sprintf("orphan-armed-%s_%s", ns, pod))
}
