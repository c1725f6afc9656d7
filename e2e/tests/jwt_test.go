package tests

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// signJWT makes a compact JWS with the given header and claims, HMAC-SHA256.
func signJWT(t *testing.T, key []byte, header, claims map[string]any) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	head := enc(header) + "." + enc(claims)
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(head))
	return head + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// The HTTP API takes short-lived HS256 JWTs signed with the key in the
// router's Secret: scoped by their `ns` claim, refused when expired, too
// long-lived, signed with another key or another algorithm. Checked with
// curl, as a BI backend's script would call it.
func TestHTTPJWTTokens(t *testing.T) {
	ip, _ := installed(t)
	half := installCredential(t, "router-jwt-key")
	key := []byte(half + half) // install.sh doubles it (32+ bytes)
	hs256 := map[string]any{"alg": "HS256", "typ": "JWT"}
	now := time.Now().Unix()
	curl := func(token, ns, name string) (int, string) {
		t.Helper()
		out, err := exec.Command("curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "20",
			"-H", "Authorization: Bearer "+token, "-H", "Content-Type: application/json",
			"-d", `{"sql": "SELECT count(*) AS n FROM shipments"}`,
			"http://"+ip+":8080/v1/namespaces/"+ns+"/datasources/"+name+"/query").Output()
		if err != nil {
			t.Fatalf("curl: %v", err)
		}
		text := strings.TrimSpace(string(out))
		i := strings.LastIndex(text, "\n")
		code, err := strconv.Atoi(text[i+1:])
		if err != nil {
			t.Fatalf("curl output %q", text)
		}
		return code, text[:max(i, 0)]
	}
	cases := []struct {
		name   string
		token  string
		ns     string
		code   int
		inBody string
	}{
		{"fresh token", signJWT(t, key, hs256, map[string]any{"exp": now + 120, "ns": []string{"tenants"}}), "tenants", 200, `"rowCount":1`},
		{"wildcard token", signJWT(t, key, hs256, map[string]any{"exp": now + 120, "ns": []string{"*"}}), "tenants", 200, `"commandTag":"SELECT 1"`},
		{"other namespace looks unknown", signJWT(t, key, hs256, map[string]any{"exp": now + 120, "ns": []string{"elsewhere"}}), "tenants", 404, "3D000"},
		{"expired", signJWT(t, key, hs256, map[string]any{"exp": now - 300, "ns": []string{"tenants"}}), "tenants", 401, "expired"},
		{"too long-lived", signJWT(t, key, hs256, map[string]any{"exp": now + 86400, "ns": []string{"tenants"}}), "tenants", 401, "lifetime"},
		{"wrong key", signJWT(t, []byte("not the router's key, 32+ bytes long"), hs256, map[string]any{"exp": now + 120, "ns": []string{"tenants"}}), "tenants", 401, "signature"},
		{"alg none", signJWT(t, key, map[string]any{"alg": "none"}, map[string]any{"exp": now + 120, "ns": []string{"tenants"}}), "tenants", 401, "invalid token"},
	}
	for _, c := range cases {
		code, body := curl(c.token, c.ns, "globex")
		if code != c.code || !strings.Contains(body, c.inBody) {
			t.Errorf("%s: %d %s, want %d with %q", c.name, code, body, c.code, c.inBody)
		}
		if strings.Contains(body, half) {
			t.Errorf("%s: the response holds the key", c.name)
		}
	}
}
