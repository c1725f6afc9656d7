package tests

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// errorCode finds the SQLSTATE of the first ErrorResponse in backend bytes.
func errorCode(b []byte) string {
	for len(b) >= 5 {
		n := int(binary.BigEndian.Uint32(b[1:5]))
		if n < 4 || len(b) < 1+n {
			return ""
		}
		if b[0] == 'E' {
			for _, f := range bytes.Split(b[5:1+n], []byte{0}) {
				if len(f) > 1 && f[0] == 'C' {
					return string(f[1:])
				}
			}
		}
		b = b[1+n:]
	}
	return ""
}

// After authentication, malformed input ends that one connection with an
// ErrorResponse (or a close) within a few seconds, and nothing else is
// affected: a bad length, a message over the size limit, an unknown
// message type and random bytes. (The startup phase has its own cases in
// tests/router_handshake.rs; the fuzz targets cover the decoders.)
func TestMalformedInputAfterStartup(t *testing.T) {
	ip, pw := installed(t)
	ctx := context.Background()
	routerPid := 0
	for name := range podIPs(t, "router") {
		p, err := client(t).CoreV1().Pods(systemNS).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			routerPid = containerPid(p)
		}
	}
	// A client that keeps working throughout.
	other, err := pgxConn(t, ip, pw, "tenants.acme", pgx.QueryExecModeExec)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)

	random := make([]byte, 256)
	if f, err := os.Open("/dev/urandom"); err == nil {
		_, _ = io.ReadFull(f, random)
		f.Close()
	}
	random[0] = 'Q' // a type the router frames, with a random length
	cases := []struct {
		name  string
		bytes []byte
		codes []string // acceptable SQLSTATEs; empty = a close is enough
	}{
		{"length below 4", []byte{'Q', 0, 0, 0, 2}, []string{"08P01"}},
		{"over the size limit", append([]byte{'Q'}, 0x04, 0, 0, 0), []string{"08P01"}},
		{"unknown message type", []byte{'y', 0, 0, 0, 8, 1, 2, 3, 4}, []string{"08P01", "08006"}},
		{"random bytes", random, nil},
	}
	for _, c := range cases {
		conn, err := pgxConn(t, ip, pw, "tenants.acme", pgx.QueryExecModeExec)
		if err != nil {
			t.Fatalf("%s: connect: %v", c.name, err)
		}
		raw := conn.PgConn().Conn()
		if _, err := raw.Write(c.bytes); err != nil {
			t.Fatalf("%s: write: %v", c.name, err)
		}
		_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(raw)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("%s: connection neither answered nor closed within 10 s (read %d bytes)", c.name, len(got))
		}
		code := errorCode(got)
		if len(c.codes) > 0 {
			ok := false
			for _, want := range c.codes {
				ok = ok || code == want
			}
			if !ok {
				t.Errorf("%s: ErrorResponse SQLSTATE %q, want one of %v", c.name, code, c.codes)
			}
		}
		t.Logf("%s: answered %q and closed", c.name, code)
		conn.Close(ctx)
		var n int
		if err := other.QueryRow(ctx, "SELECT count(*) FROM orders").Scan(&n); err != nil || n != 500 {
			t.Fatalf("after %s, another client failed: %v", c.name, err)
		}
	}
	for name := range podIPs(t, "router") {
		p, err := client(t).CoreV1().Pods(systemNS).Get(ctx, name, metav1.GetOptions{})
		if err == nil && routerPid != 0 && containerPid(p) != routerPid {
			t.Errorf("the router process changed (%d -> %d): it crashed", routerPid, containerPid(p))
		}
	}
}
