package tests

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Rotating the router's auth Secret takes effect without a restart: a user
// added to it logs in within 10 s, a changed password replaces the old one,
// a version that does not parse is refused (the previous credentials stay),
// and a session that was already open carries on throughout.
func TestRouterAuthSecretRotation(t *testing.T) {
	ip, pw := installed(t)
	c := client(t)
	ctx := context.Background()
	secrets := c.CoreV1().Secrets(systemNS)
	orig, err := secrets.Get(ctx, "shardpool-router-auth", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	original := string(orig.Data["users"])
	t.Cleanup(func() {
		s, err := secrets.Get(context.Background(), "shardpool-router-auth", metav1.GetOptions{})
		if err == nil {
			s.Data["users"] = []byte(original)
			_, _ = secrets.Update(context.Background(), s, metav1.UpdateOptions{})
		}
	})
	setUsers := func(users string) {
		t.Helper()
		s, err := secrets.Get(ctx, "shardpool-router-auth", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Data["users"] = []byte(users)
		if _, err := secrets.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	login := func(user, password string) error {
		cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=5432 user=%s dbname=tenants.acme sslmode=disable connect_timeout=5", ip, user))
		if err != nil {
			return err
		}
		cfg.Password = password
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		conn, err := pgx.ConnectConfig(cctx, cfg)
		if err != nil {
			return err
		}
		defer conn.Close(context.Background())
		var one int
		return conn.QueryRow(cctx, "SELECT 1").Scan(&one)
	}
	routerPid := func() int {
		pods, err := c.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=router"})
		if err != nil || len(pods.Items) != 1 {
			t.Fatalf("router pods: %v", err)
		}
		return containerPid(&pods.Items[0])
	}
	pid := routerPid()
	open, err := pgxConn(t, ip, pw, "tenants.acme", pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close(context.Background())
	stillOpen := func(when string) {
		t.Helper()
		var one int
		if err := open.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
			t.Fatalf("the session opened before the rotation, %s: %v", when, err)
		}
	}

	user := fmt.Sprintf("rot%d", time.Now().UnixNano()%1_000_000)
	pw1, pw2 := base64.RawURLEncoding.EncodeToString([]byte(user+"-first-pw")), base64.RawURLEncoding.EncodeToString([]byte(user+"-second-pw"))
	if err := login(user, pw1); err == nil {
		t.Fatalf("%s logged in before it existed", user)
	}
	t0 := time.Now()
	setUsers(strings.TrimRight(original, "\n") + "\n" + user + ":" + pw1 + ":tenants\n")
	eventually(t, 10*time.Second, "the added user logs in", func() (bool, error) {
		err := login(user, pw1)
		return err == nil, err
	})
	added := time.Since(t0)
	stillOpen("after a user was added")

	t0 = time.Now()
	setUsers(strings.TrimRight(original, "\n") + "\n" + user + ":" + pw2 + ":tenants\n")
	eventually(t, 10*time.Second, "the new password in, the old one out", func() (bool, error) {
		if err := login(user, pw2); err != nil {
			return false, err
		}
		return login(user, pw1) != nil, fmt.Errorf("the old password still works")
	})
	changed := time.Since(t0)
	stillOpen("after a password change")

	// A version that does not parse: refused, the previous credentials stay.
	setUsers("this line has no password\n")
	time.Sleep(3 * time.Second)
	if err := login(user, pw2); err != nil {
		t.Errorf("after a malformed version, the previous credentials should stay: %v", err)
	}
	if err := login("bi", pw); err != nil {
		t.Errorf("after a malformed version, bi should still log in: %v", err)
	}
	stillOpen("after a malformed version")
	if p := routerPid(); p != pid {
		t.Errorf("the router process changed (%d -> %d): rotation should need no restart", pid, p)
	}
	t.Logf("auth secret rotation without restart: user added, logged in after %s; password changed, new in / old out after %s", added.Round(10*time.Millisecond), changed.Round(10*time.Millisecond))
}
