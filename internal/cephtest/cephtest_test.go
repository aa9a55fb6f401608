package cephtest

import (
	"strings"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

// TestCluster creates, lists and removes an image on the cluster.
func TestCluster(t *testing.T) {
	conf := Conf(t)
	if d := StartupTime(); d > 0 {
		t.Logf("cluster up in %v", d)
	}
	name := ImageName(t)
	Rbd(t, conf, "create", "--size", "4M", Pool+"/"+name)
	if out := Rbd(t, conf, "ls", Pool); !strings.Contains(out, name) {
		t.Fatalf("rbd ls: %q lacks %s", out, name)
	}
	Remove(conf, name)
	if out := Rbd(t, conf, "ls", Pool); strings.Contains(out, name) {
		t.Fatalf("rbd ls after remove: %q still has %s", out, name)
	}
}
