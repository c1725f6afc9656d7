package podrunner

import (
	"fmt"
	"sync"
)

// ipAllocator hands out pod IPs from <prefix>.0.2 .. <prefix>.255.254, all on
// the loopback interface (Linux routes the whole 127.0.0.0/8 to lo).
type ipAllocator struct {
	prefix string
	// mu guards used and next.
	mu   sync.Mutex
	used map[string]bool
	next int
}

func newIPAllocator(prefix string) *ipAllocator {
	return &ipAllocator{prefix: prefix, used: map[string]bool{}, next: 2}
}

func (a *ipAllocator) allocate() (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := 0; i < 65000; i++ {
		n := a.next
		a.next++
		if a.next >= 65534 {
			a.next = 2
		}
		if n%256 == 0 || n%256 == 255 {
			continue
		}
		ip := fmt.Sprintf("%s.%d.%d", a.prefix, n/256, n%256)
		if !a.used[ip] {
			a.used[ip] = true
			return ip, nil
		}
	}
	return "", fmt.Errorf("no free pod IP in %s.0.0/16", a.prefix)
}

func (a *ipAllocator) release(ip string) {
	a.mu.Lock()
	delete(a.used, ip)
	a.mu.Unlock()
}
