package tests

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// linkSecret reads tls.crt, tls.key and ca.crt of a link PKI Secret (as the
// cluster admin: this is what an attacker with a stolen Secret would hold).
func linkSecret(t *testing.T, name string) (cert tls.Certificate, ca *x509.CertPool) {
	t.Helper()
	s, err := client(t).CoreV1().Secrets(systemNS).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("link secret %s: %v", name, err)
	}
	cert, err = tls.X509KeyPair(s.Data["tls.crt"], s.Data["tls.key"])
	if err != nil {
		t.Fatalf("link secret %s: %v", name, err)
	}
	ca = x509.NewCertPool()
	if !ca.AppendCertsFromPEM(s.Data["ca.crt"]) {
		t.Fatalf("link secret %s: no CA", name)
	}
	return cert, ca
}

// selfSigned makes a certificate that claims to be the router, signed by
// nobody the shards trust.
func selfSigned(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.X509KeyPair(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// openFrame is the link's Open frame for a source: session 1, kind 'O'.
func openFrame(source string) []byte {
	var b bytes.Buffer
	_ = binary.Write(&b, binary.BigEndian, uint32(1))
	b.WriteByte('O')
	_ = binary.Write(&b, binary.BigEndian, uint32(len(source)))
	b.WriteString(source)
	return b.Bytes()
}

// tryLink speaks the link protocol on conn: the greeting, then an Open
// frame for tenants/acme; it returns what the shard answered (nil when it
// answered nothing before closing or timing out).
func tryLink(conn net.Conn) []byte {
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(append([]byte("SHPOOL03"), openFrame("tenants/acme")...)); err != nil {
		return nil
	}
	buf := make([]byte, 4096)
	var got []byte
	for len(got) < 8+9 {
		n, err := conn.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
	}
	return got
}

// A shard's data port admits only this release's routers: acting as any
// other pod in the cluster (this test process reaches the pod IPs), the old
// attack (greeting plus Open in plain TCP), TLS without a certificate, a
// self-signed "router" certificate, and a shard's own certificate presented
// as a client are each refused before a frame is answered. The router's
// certificate does open a session (the check can pass), and the router's
// own links work (every other test).
func TestShardDataPortRefusesAllButRouters(t *testing.T) {
	installed(t)
	c := client(t)
	pods, err := c.CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=shard,shardpool.dev/shard=0"})
	if err != nil || len(pods.Items) == 0 || pods.Items[0].Status.PodIP == "" {
		t.Fatalf("shard 0 pod: %v", err)
	}
	addr := net.JoinHostPort(pods.Items[0].Status.PodIP, "6432")
	name := "shard-0.shardpool." + systemNS + ".shardpool.link"
	routerCert, ca := linkSecret(t, "shardpool-link-router")
	shard1Cert, _ := linkSecret(t, "shardpool-link-shard-1")

	dialTLS := func(certs []tls.Certificate) ([]byte, error) {
		raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return nil, err
		}
		defer raw.Close()
		conn := tls.Client(raw, &tls.Config{ServerName: name, RootCAs: ca, Certificates: certs, MinVersion: tls.VersionTLS13})
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if err := conn.Handshake(); err != nil {
			return nil, err
		}
		return tryLink(conn), nil
	}
	answered := func(got []byte) bool { return bytes.HasPrefix(got, []byte("SHPOOL03")) }

	// The old attack: plain TCP, greeting and Open.
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	got := tryLink(raw)
	raw.Close()
	if answered(got) {
		t.Errorf("plain TCP greeting + Open answered: %q", got)
	}
	t.Logf("plain TCP hello + Open: %d bytes back, no greeting", len(got))

	for _, tc := range []struct {
		what  string
		certs []tls.Certificate
	}{
		{"no client certificate", nil},
		{"a self-signed router certificate", []tls.Certificate{selfSigned(t, "router.shardpool."+systemNS+".shardpool.link")}},
		{"shard 1's certificate as a client", []tls.Certificate{shard1Cert}},
	} {
		got, err := dialTLS(tc.certs)
		if err == nil && answered(got) {
			t.Errorf("%s: the shard answered the link protocol", tc.what)
			continue
		}
		t.Logf("%s: refused (%v)", tc.what, firstLine(err, got))
	}

	// The router's certificate: greeting echoed, the session opens.
	got, err = dialTLS([]tls.Certificate{routerCert})
	if err != nil || !answered(got) {
		t.Fatalf("with the router's certificate: %v, %q", err, got)
	}
	if len(got) < 8+9 || got[8+4] != 'o' {
		t.Fatalf("with the router's certificate the session did not open: %q", got)
	}
	t.Logf("with the router's certificate: greeted, session opened")

	// A router that dials shard 0's address must find shard 0 there: shard
	// 1's certificate under shard 0's name is refused by the client check
	// (Go's verifier here, rustls' in the router).
	leaf, err := x509.ParseCertificate(shard1Cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := leaf.VerifyHostname(name); err == nil {
		t.Errorf("shard 1's certificate is valid for shard 0's name %s", name)
	}
}

func firstLine(err error, got []byte) string {
	if err != nil {
		return strings.SplitN(err.Error(), "\n", 2)[0]
	}
	return fmt.Sprintf("%d bytes, no greeting", len(got))
}

// Renewing every link certificate, the CA included, breaks no running link
// or session: a client queries all along through links made before, and
// links made after (a shard pod replaced) use the new certificates.
func TestLinkCertificatesRotateWithoutBreakingLinks(t *testing.T) {
	ip, pw := installed(t)
	c := client(t)
	ctx := context.Background()
	secrets := c.CoreV1().Secrets(systemNS)
	names := []string{"shardpool-link-ca", "shardpool-link-router", "shardpool-link-shard-0", "shardpool-link-shard-1"}
	before := map[string]string{}
	for _, n := range names {
		s, err := secrets.Get(ctx, n, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		before[n] = string(s.Data["tls.crt"])
	}
	// Load on every example source through links that exist now.
	stop := make(chan struct{})
	type tally struct{ queries, failed int }
	results := make(chan tally, 3)
	for _, db := range []string{"tenants.acme", "tenants.globex", "tenants.initech"} {
		conn, err := pgxConn(t, ip, pw, db, pgx.QueryExecModeSimpleProtocol)
		if err != nil {
			t.Fatal(err)
		}
		go func(db string) {
			defer conn.Close(context.Background())
			var tl tally
			for {
				select {
				case <-stop:
					results <- tl
					return
				default:
				}
				qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				var one int
				err := conn.QueryRow(qctx, "SELECT 1").Scan(&one)
				cancel()
				tl.queries++
				if err != nil {
					tl.failed++
					t.Logf("%s: %v", db, err)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}(db)
	}
	t0 := time.Now()
	for _, n := range names {
		if err := secrets.Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatalf("delete %s: %v", n, err)
		}
	}
	eventually(t, 90*time.Second, "every link certificate issued again", func() (bool, error) {
		for _, n := range names {
			s, err := secrets.Get(ctx, n, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			if string(s.Data["tls.crt"]) == before[n] {
				return false, fmt.Errorf("%s unchanged", n)
			}
		}
		return true, nil
	})
	reissued := time.Since(t0)
	// Links made before keep working with the renewed certificates in place.
	time.Sleep(5 * time.Second)
	close(stop)
	var total tally
	for i := 0; i < 3; i++ {
		r := <-results
		total.queries += r.queries
		total.failed += r.failed
	}
	t.Logf("CA and certificates re-issued %s after deletion; %d queries on links made before, %d failed",
		reissued.Round(time.Second), total.queries, total.failed)
	if total.failed > 0 || total.queries < 100 {
		t.Errorf("%d of %d queries failed during the rotation", total.failed, total.queries)
	}
	// New links: replace shard 0's pod; its sources must answer again
	// through a new link made with the new certificates on both sides.
	oldHolder, _, _ := kubectl(t, "", "-n", systemNS, "get", "lease", "shardpool-shard-0", "-o", "jsonpath={.spec.holderIdentity}")
	if _, stderr, err := kubectl(t, "", "-n", systemNS, "delete", "pod", "-l", "shardpool.dev/shard=0", "--wait=false"); err != nil {
		t.Fatalf("delete shard 0 pod: %v\n%s", err, stderr)
	}
	shard0 := ""
	for _, src := range []string{"acme", "globex", "initech"} {
		out, _, _ := kubectl(t, "", "-n", "tenants", "get", "datasources.shardpool.dev", src, "-o", "jsonpath={.status.shard}")
		if out == "0" {
			shard0 = "tenants." + src
			break
		}
	}
	if shard0 == "" {
		t.Fatal("no example source on shard 0")
	}
	eventually(t, 90*time.Second, shard0+" answers through a link to the new shard 0 pod", func() (bool, error) {
		holder, _, _ := kubectl(t, "", "-n", systemNS, "get", "lease", "shardpool-shard-0", "-o", "jsonpath={.spec.holderIdentity}")
		if holder == "" || holder == oldHolder {
			return false, fmt.Errorf("shard 0 still held by %q", holder)
		}
		conn, err := pgxConn(t, ip, pw, shard0, pgx.QueryExecModeSimpleProtocol)
		if err != nil {
			return false, err
		}
		defer conn.Close(context.Background())
		var one int
		err = conn.QueryRow(ctx, "SELECT 1").Scan(&one)
		return err == nil, err
	})
	t.Logf("%s answered through a new link to the replacement of %s", shard0, oldHolder)
}

// A version 5 Open names the client; one whose fields do not parse closes
// that link only (the shard answers the greeting, then nothing), and a
// well-formed one on a new link opens its session.
func TestLinkV5OpenIsCheckedPerLink(t *testing.T) {
	installed(t)
	c := client(t)
	pods, err := c.CoreV1().Pods(systemNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=shard,shardpool.dev/shard=0"})
	if err != nil || len(pods.Items) == 0 || pods.Items[0].Status.PodIP == "" {
		t.Fatalf("shard 0 pod: %v", err)
	}
	addr := net.JoinHostPort(pods.Items[0].Status.PodIP, "6432")
	routerCert, ca := linkSecret(t, "shardpool-link-router")
	try := func(payload string) []byte {
		raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		conn := tls.Client(raw, &tls.Config{ServerName: "shard-0.shardpool." + systemNS + ".shardpool.link", RootCAs: ca, Certificates: []tls.Certificate{routerCert}, MinVersion: tls.VersionTLS13})
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		var b bytes.Buffer
		b.WriteString("SHPOOL05")
		_ = binary.Write(&b, binary.BigEndian, uint32(1))
		b.WriteByte('O')
		_ = binary.Write(&b, binary.BigEndian, uint32(len(payload)))
		b.WriteString(payload)
		if _, err := conn.Write(b.Bytes()); err != nil {
			t.Fatal(err)
		}
		var got []byte
		buf := make([]byte, 4096)
		for len(got) < 8+9 {
			n, err := conn.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				break
			}
		}
		return got
	}
	bad := try("tenants/acme\x00bi\x00heavy\x00\x00\x00")
	if !bytes.Equal(bad, []byte("SHPOOL05")) {
		t.Errorf("malformed Open: want the greeting and then a closed link, got %q", bad)
	}
	good := try("tenants/acme\x00bi\x003\x00dash\x00\x00")
	if len(good) < 8+9 || good[8+4] != 'o' {
		t.Fatalf("well-formed version 5 Open: the session did not open: %q", good)
	}
}
